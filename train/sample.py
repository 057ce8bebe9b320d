"""Text from a model: during training (``generate_text``) and from a checkpoint on the command line.

    python -m train.sample --ckpt <checkpoint dir or run dir> --prompt "ROMEO:" --max-new-tokens 100
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


@torch.no_grad()
def generate_text(engine, tok, prompt: str, max_new_tokens: int, *, temperature: float = 0.8,
                  top_k: int | None = 200, seed: int = 0) -> str:
    """Sample ``max_new_tokens`` after ``prompt``. Collective: every rank calls it, rank 0 gets the text.

    Uses its own ``torch.Generator`` so sampling never moves the training RNG streams (exact resume), and
    draws only ids the tokenizer has (a model vocabulary may be padded beyond it)."""
    ids = tok.encode(prompt) or [tok.eot_token]
    idx = torch.tensor([ids], dtype=torch.long, device=engine.device)  # [1, T]
    gen = torch.Generator(device=engine.device)
    gen.manual_seed(seed)
    out = engine.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen,
                          vocab_limit=tok.n_vocab)
    return "" if out is None else tok.decode(out[0, len(ids):].tolist())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.sample", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint dir (step_NNNNNNN) or run dir (uses checkpoints/latest)")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--tokenizer", default=None, help="default: the run's data.tokenizer (config.yaml), else gpt2")
    args = p.parse_args(argv)

    from model import GPT, GPTConfig
    from train.checkpoint import resolve_checkpoint
    from train.data import get_tokenizer
    from train.export import load_full_state_dict

    try:
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 0")
        ckpt = resolve_checkpoint(args.ckpt)
        tok_name = args.tokenizer
        run_cfg = ckpt.parent.parent / "config.yaml"
        if tok_name is None and run_cfg.is_file():
            from omegaconf import OmegaConf

            tok_name = OmegaConf.load(run_cfg).get("data", {}).get("tokenizer")
        tok = get_tokenizer(tok_name or "gpt2")
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        state, meta = load_full_state_dict(ckpt)  # any format: dcp (every layout), deepspeed, torch
        cfg = GPTConfig.from_dict(meta["model_config"])
        if tok.n_vocab > cfg.vocab_size:
            raise ValueError(f"the tokenizer {tok.name!r} has {tok.n_vocab} tokens but the checkpoint's model has "
                             f"vocab_size={cfg.vocab_size}; pass the run's tokenizer with --tokenizer")
        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device=device)
        model.load_state_dict(state)
        model.tie_weights()
        model.init_buffers()
        model.eval()
        del state
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    ids = tok.encode(args.prompt) or [tok.eot_token]
    for i in range(args.num_samples):
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=gen,
                             vocab_limit=tok.n_vocab)
        text = tok.decode(out[0].tolist())
        if args.num_samples > 1:
            print(f"--- sample {i + 1} (step {meta['step']}) ---")
        print(text)
    print(json.dumps({"checkpoint": str(ckpt), "step": meta["step"]}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
