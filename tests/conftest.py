"""One persistent XLA compilation cache for the whole test session, this process and the
training subprocesses it starts (``JAX_COMPILATION_CACHE_DIR``). Many tests compile the same
programs (the same tiny detector's train and eval steps under different closures), and on a
2-core CPU compiling is most of their time. The cache is keyed on the program and the
compiler flags, so a hit runs the very executable a fresh compile would give.
``CSDFD_TEST_XLA_CACHE=0`` turns it off."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import pytest

_DIR = None
if os.environ.get("CSDFD_TEST_XLA_CACHE", "1") != "0":
  _DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR") or tempfile.mkdtemp(prefix="csdfd_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _DIR
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  jax.config.update("jax_compilation_cache_dir", _DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_sessionfinish(session, exitstatus):
  if _DIR and _DIR.startswith(tempfile.gettempdir()) and "csdfd_xla_" in _DIR:
    shutil.rmtree(_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def peer_records(tmp_path_factory) -> str:
  """Tiny demo records (original "gan" fakes, "swap" as the unseen set) for the peer methods'
  end-to-end tests."""
  from csdfd_jax.data import builder, demo

  base = tmp_path_factory.mktemp("peers")
  store = demo.make_demo_store(
    base / "store", size=64, train=4, val=2, test=2, unseen=2, frames=2, families=("gan", "swap")
  )
  return str(builder.build_records(store, base / "records"))
