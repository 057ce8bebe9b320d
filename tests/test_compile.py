"""train.compile=true on CPU: TorchInductor compiles each block to C++ kernels, and training gives the eager
losses; a machine without a C++ compiler gets a one-line error before any work.

Oracle: the eager one-process run of helpers.single_run (char corpus, 2-layer 64-wide GPT-2, global batch 4 x 32
tokens, 20 AdamW steps at lr 3e-3, val loss at steps 10 and 20), shared with test_fsdp / test_zero when they
run in the same session. Both compiled runs here are in-process and use the oracle's shapes, so the second
finds the first one's kernels in Inductor's cache whenever its graph is the same.

Tolerance 1e-5 on losses of 3.2-4.6 (20-40 float32 ulps): Inductor fuses the pointwise ops and reorders
reductions (layer-norm statistics, bias- and weight-gradient sums over B*T), each a rounding change of ~1e-7
relative that 20 Adam steps carry on. Measured: compiled losses within 1 ulp (4.8e-7) of the eager ones, val
losses equal; 1e-5 is also the bound test_fsdp allows for sharded-vs-one-process reduction order. It is
discriminating: a 1% change of the learning rate moves the losses of steps 2-20 by 1e-3 to 8e-3.

Cost on the 2-core CI machine: ~55 s with a cold Inductor cache (first run on a machine: ~25 s of that is
Inductor probing the CPU's vector ISA by compiling test programs, once per cache), ~15 s when the kernels
are cached; plus the shared oracle run (~12 s) when no other test made it.
"""

from __future__ import annotations

import pytest
from helpers import (
    CHAR,
    CHAR_BASE,
    TINY,
    assert_losses_close,
    corpus_overrides,
    losses_by_step,
    losses_of,
    one_line_error,
    single_losses,
    single_run,
    train_in_process,
)

# the oracle's global batch of 4 on one process; the final eval (2 batches) runs, samples and periodic
# checkpoints do not (each extra mode is one more compiled graph: seconds of C++ compilation)
COMPILED = [*CHAR.overrides, *CHAR_BASE, "train.max_steps=20", "train.micro_batch_size=4", "train.eval_every=0",
            "train.sample_tokens=0", "train.ckpt_every=0", "train.compile=true"]


@pytest.fixture
def cxx() -> None:
    """Skip (saying why) where Inductor would find no C++ compiler: the error test below covers that case."""
    from train.parallelize import _cpp_compiler_problem

    problem = _cpp_compiler_problem()
    if problem is not None:
        pytest.skip(f"TorchInductor on CPU needs a C++ compiler: {problem}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with no compiled code and zeroed Dynamo counters, and leaves none behind."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module", autouse=True)
def _stop_compile_workers():
    """Inductor compiles kernels in a pool of worker processes that would idle on for the rest of the session."""
    yield
    from torch._inductor import async_compile

    shutdown = getattr(async_compile, "shutdown_compile_workers", None)  # private; absent -> they end at exit
    if shutdown is not None:
        shutdown()


def _compiled_run(tmp_path_factory, name: str, *overrides: str):
    run_dir = tmp_path_factory.mktemp("compile") / name
    code, run_dir = train_in_process(run_dir, *COMPILED, *corpus_overrides(tmp_path_factory), *overrides)
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def eager(tmp_path_factory) -> dict:
    """The oracle run (made here unless another test module made it in this session): losses, val losses
    and its final checkpoint."""
    run = single_run(tmp_path_factory)
    return {"loss": single_losses(tmp_path_factory), "val_loss": losses_by_step(run, "val_loss"),
            "ckpt": run / "checkpoints" / "step_0000020"}


def _check_losses(run_dir, eager: dict) -> None:
    got = dict(enumerate(losses_of(run_dir), start=1))
    assert sorted(got) == list(range(1, 21))
    assert_losses_close(got, eager["loss"], range(1, 21), 1e-5)
    val = losses_by_step(run_dir, "val_loss")
    assert sorted(val) == [0, 20]  # before training and the final eval
    assert_losses_close(val, eager["val_loss"], [0, 20], 1e-5)


def test_compiled_single_matches_eager_and_blocks_share_one_graph(tmp_path_factory, eager, cxx):
    """strategy=single fp32: the 20 losses and the val losses equal the eager run's. Both blocks run one
    compiled training graph (Dynamo guards on the block's type, not its identity,
    and takes parameters as inputs): a second graph comes only from the final eval (no-grad mode), and
    nothing breaks the graph."""
    from torch._dynamo.utils import counters

    from train.export import load_full_state_dict

    run_dir = _compiled_run(tmp_path_factory, "single", "strategy=single")
    _check_losses(run_dir, eager)
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # train + eval, for 2 blocks

    # compiled in place: the checkpoint holds the eager parameter names (no "_orig_mod." prefix), with the
    # eager shapes. Its values are judged by the val loss above, not element-wise: k_proj.bias has an
    # exactly-zero gradient (softmax ignores a constant added to every key), and Adam turns that rounding
    # noise into steps of up to lr, so those elements differ by ~1e-5 between any two reduction orders
    got, meta = load_full_state_dict(run_dir / "checkpoints" / "step_0000020")
    want, _ = load_full_state_dict(eager["ckpt"])
    assert meta["format"] == "dcp"
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(run_dir / "checkpoints" / "step_0000020")).read_metadata().state_dict_metadata
    names = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    assert names == set(want), sorted(names ^ set(want))[:5]  # the plain model's names, as DCP stored them
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}


def test_compiled_fsdp2_with_selective_ac_matches_eager(tmp_path_factory, eager, cxx):
    """strategy=fsdp (FSDP2, one rank: the fully_shard hooks, DTensor parameters and unshard/reshard of the
    real strategy around each compiled block) with selective activation checkpointing inside the compiled
    block -- the order AC -> compile -> FSDP2 that big runs use: the eager losses and val loss."""
    from torch._dynamo.utils import counters

    run_dir = _compiled_run(tmp_path_factory, "fsdp_sac", "strategy=fsdp", "train.activation_checkpointing=selective")
    _check_losses(run_dir, eager)
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_no_cpp_compiler_is_a_one_line_error_before_training(tmp_path, capsys):
    """Inductor's CPU kernels need a C++ compiler: without one, the run stops at build time with one line
    naming the compiler it tried (not Inductor's 100-line traceback at the first step), and leaves no run dir."""
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.cxx": (None, "no-such-cxx-compiler")}):
        code, run_dir = train_in_process(tmp_path / "run", *TINY, "train.compile=true")
    assert code == 2
    line = one_line_error(capsys.readouterr().err)
    assert "train.compile=true on CPU needs a C++ compiler" in line and "no-such-cxx-compiler" in line, line
    assert not run_dir.exists()
