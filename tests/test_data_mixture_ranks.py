"""data.mixture through the trainer: 2 gloo ranks see, step by step, exactly the samples of one process
(rank 0 then rank 1 = the single process's micro-batch), with the same losses; 10 steps on 2 ranks resumed
on 1 rank (and 10 steps on 1 rank resumed on 2) train on the uninterrupted run's tokens with its losses
(fp32, within 1e-5); per-source tokens/epochs are in metrics.jsonl and eval reports a val loss per source.

Four runs in all (two of them on 2 ranks), shared by the tests through module-scoped fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TINY, losses_by_step, read_metrics, run_train, train_in_process

STEPS, CUT = 14, 10


def _corpus(path: Path, word: str, n_docs: int) -> Path:
    docs = [{"text": f"{word} {i}: " + " ".join(f"{word}{i}x{j}" for j in range(40))} for i in range(n_docs)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mixranks")
    a, b = _corpus(d / "alpha.jsonl", "alpha", 30), _corpus(d / "beta.jsonl", "beta", 30)
    mixture = (f"data.mixture=[{{source: shakespeare, weight: 0.5}}, {{source: text, path: '{a}', weight: 0.3}}, "
               f"{{source: text, path: '{b}', weight: 0.2}}]")
    common = (*TINY, mixture, "optim.decay_steps=20", "optim.warmup_steps=3", f"train.ckpt_every={CUT}",
              "train.trace_samples=true", f"train.max_steps={STEPS}", "train.eval_steps=2")
    out = {"one": d / "one", "two": d / "two", "two_then_one": d / "two_then_one", "one_then_two": d / "one_then_two"}
    assert train_in_process(out["one"], *common, "train.micro_batch_size=4")[0] == 0
    res = run_train(out["two"], *common, "strategy=ddp", "train.micro_batch_size=2", "data.num_workers=2", nproc=2)
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = f"checkpoints/step_{CUT:07d}"
    assert train_in_process(out["two_then_one"], *common, "train.micro_batch_size=4",
                            f"resume={out['two'] / ckpt}")[0] == 0
    res = run_train(out["one_then_two"], *common, "strategy=ddp", "train.micro_batch_size=2",
                    f"resume={out['one'] / ckpt}", nproc=2)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def samples(run_dir: Path, ranks: int) -> dict[int, list[str]]:
    """step -> the hashes of its samples in global order (rank 0's, then rank 1's)."""
    out: dict[int, list[str]] = {}
    for r in range(ranks):
        for line in (run_dir / "trace" / f"rank{r}.jsonl").read_text().splitlines():
            e = json.loads(line)
            out.setdefault(e["step"], []).extend(e["samples"])
    return out


def test_two_ranks_see_the_single_process_stream(runs):
    one, two = samples(runs["one"], 1), samples(runs["two"], 2)
    assert sorted(one) == list(range(1, STEPS + 1))
    assert two == one  # same samples, same order: rank r holds slice r of the global batch
    a, b = losses_by_step(runs["one"]), losses_by_step(runs["two"])
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5, (a, b)
    assert a[STEPS] < a[1] - 0.1  # it learned: agreement is not trivial


@pytest.mark.parametrize("resumed,straight,ranks", [("two_then_one", "one", 1), ("one_then_two", "two", 2)])
def test_resume_on_another_world_size(runs, resumed, straight, ranks):
    got, want = samples(runs[resumed], ranks), samples(runs[straight], ranks)
    assert sorted(got) == list(range(CUT + 1, STEPS + 1))  # only the resumed steps ran here
    assert all(got[s] == want[s] for s in got)
    a, b = losses_by_step(runs[resumed]), losses_by_step(runs[straight])
    assert all(abs(a[s] - b[s]) < 1e-5 for s in range(CUT + 1, STEPS + 1)), (a, b)


def test_per_source_metrics_and_val_loss(runs):
    events = read_metrics(runs["two_then_one"])
    last = [e for e in events if "loss" in e][-1]
    tokens = {k: v for k, v in last.items() if k.startswith("data/") and k.endswith("/tokens")}
    assert set(tokens) == {"data/shakespeare/tokens", "data/alpha/tokens", "data/beta/tokens"}
    assert sum(tokens.values()) == last["tokens"] == STEPS * 4 * 32  # every token of the run, per source
    assert all(v > 0 for v in tokens.values()) and last["data/alpha/epochs"] > 0
    # the resumed run's accounting continues the checkpoint's: equal to the uninterrupted run's
    straight = [e for e in read_metrics(runs["one"]) if "loss" in e][-1]
    assert {k: straight[k] for k in tokens} == tokens
    val = [e for e in events if "val_loss" in e][-1]
    assert {"val_loss/shakespeare", "val_loss/alpha", "val_loss/beta"} <= set(val)
    assert len({round(val[k], 4) for k in ("val_loss/shakespeare", "val_loss/alpha", "val_loss/beta")}) == 3
