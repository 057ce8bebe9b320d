"""Shared pytest set-up: import paths, the ``gpu`` marker, a quiet, offline environment, and CI's
no-silent-skip rule.

Under ``CI=true`` (``.ci/run`` sets it) a test may skip only for hardware this machine does not
have: the ``gpu`` marker (no CUDA GPU), or its mirror, a test that needs a machine *without* one.
Any other skip -- Slurm not installable, deepspeed missing, no C++ compiler for torch.compile, a
``skipif`` on a file that moved -- fails the test with the skip's reason, and a module skipped at
import (``pytest.importorskip``) is a collection error with the reason. Tests that start two
Slurm nodes also need network namespaces there (else the nodes would silently share loopback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
for p in (str(TESTS.parent), str(TESTS)):  # `import helpers` and `import train` from any cwd
    if p not in sys.path:
        sys.path.insert(0, p)

os.environ.setdefault("WANDB_MODE", "offline")  # no test ever talks to wandb.ai
os.environ.setdefault("WANDB_SILENT", "true")

GPU_SKIP = "needs a CUDA GPU"
# skip reasons CI accepts besides the gpu marker: hardware, not a missing install
CI_HARDWARE_SKIPS = ("needs a machine without a CUDA GPU",)
# fixtures that start a multi-node cluster whose nodes should each get a network namespace
NETNS_FIXTURES = ("slurm_cluster_2n",)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# modules whose tests start several ranks (torchrun, spawned gloo groups, Slurm jobs) or reuse runs that do:
# marked `slow`, so `make test-fast` (-m "not slow") is the single-process edit loop
MULTI_RANK_MODULES = {"test_export", "test_faults", "test_fsdp", "test_model_init_sharded", "test_multinode",
                      "test_ops_hang", "test_sharded", "test_slurm", "test_tp", "test_train_signals",
                      "test_data_mixture_ranks", "test_hf_stream", "test_document_mask_tp",
                      "test_zero", "test_zero_falcon"}


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if item.module is not None and item.module.__name__ in MULTI_RANK_MODULES:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _ci_skip_allowed(item: pytest.Item, reason: str) -> bool:
    return "gpu" in item.keywords or any(r in reason for r in CI_HARDWARE_SKIPS)


def _ci_failure(item: pytest.Item, skipped: BaseException) -> str | None:
    """The failure message for a skip that CI does not accept, else None."""
    reason = getattr(skipped, "msg", None) or str(skipped)
    if in_ci() and not _ci_skip_allowed(item, reason):
        return f"CI=true: a missing prerequisite fails instead of skipping: {reason}"
    return None


_netns_ok: bool | None = None


def _require_netns(item: pytest.Item) -> None:
    global _netns_ok
    if not in_ci() or not any(f in getattr(item, "fixturenames", ()) for f in NETNS_FIXTURES):
        return
    if _netns_ok is None:
        from slurm_cluster import _netns_works

        _netns_ok = _netns_works()
    if not _netns_ok:
        pytest.fail("CI=true: network namespaces are unavailable (needs root and iproute2's `ip netns add`): "
                    "the 2-node Slurm tests would fall back to loopback", pytrace=False)


def _skips_fail_in_ci(item: pytest.Item):
    """The body of a hook wrapper: a skip raised inside it fails the test under CI=true (``_ci_failure``)."""
    try:
        return (yield)
    except pytest.skip.Exception as e:
        failure = _ci_failure(item, e)
        if failure is None:
            raise
    pytest.fail(failure, pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):  # skipif / skip markers, fixtures that skip (Slurm, C++ compiler)
    _require_netns(item)
    return (yield from _skips_fail_in_ci(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):  # pytest.skip() in a test body
    return (yield from _skips_fail_in_ci(item))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A module skipped at import (pytest.importorskip) is a collection error under CI=true."""
    rep = yield
    if in_ci() and rep.skipped:
        longrepr = rep.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        try:
            pytest.fail(f"CI=true: a missing prerequisite fails instead of skipping: {reason}", pytrace=False)
        except pytest.fail.Exception:
            excinfo = pytest.ExceptionInfo.from_current()
        rep.outcome = "failed"
        rep.longrepr = collector.repr_failure(excinfo)
    return rep


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Every skipped test by name with its reason (pytest's -ra groups skips by file and line);
    the short test summary and the totals follow it, so `make test` ends with both."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    if not skipped and not terminalreporter.stats.get("passed"):
        return
    terminalreporter.section(f"skipped tests: {len(skipped)}" + (" (CI=true)" if in_ci() else ""), sep="-")
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        terminalreporter.line(f"{rep.nodeid}: {reason.removeprefix('Skipped: ')}")
