"""Text from a model: during training (``generate_text``) and from a checkpoint on the command line.

    python -m train.sample --ckpt <checkpoint dir or run dir> --prompt "ROMEO:" --max-new-tokens 100
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


@torch.no_grad()
def generate_text(strategy, tok, prompt: str, max_new_tokens: int, *, temperature: float = 0.8,
                  top_k: int | None = 200, seed: int = 0) -> str:
    """Sample ``max_new_tokens`` after ``prompt``. Collective: every rank calls it, rank 0 gets the text.

    Uses its own ``torch.Generator`` so sampling never moves the training RNG streams (exact resume).
    Replicated strategies (single, ddp) decode on rank 0 with the model's KV cache; sharded ones run
    the uncached loop through ``strategy.eval_logits`` on every rank (identical logits and generator,
    hence identical tokens on every rank).
    """
    device = strategy.device
    ids = tok.encode(prompt) or [tok.eot_token]
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # [1, T]
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    if strategy.name in ("single", "ddp"):
        if not strategy.dist.is_main:
            return ""
        model = strategy.raw_model
        with strategy.precision.autocast_ctx():
            out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    else:
        block = strategy.gpt_config.block_size
        out = idx
        for _ in range(max_new_tokens):
            logits = strategy.eval_logits(out[:, -block:])[:, -1].float()  # [1, V]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            out = torch.cat([out, nxt], dim=1)
    return tok.decode(out[0, len(ids):].tolist())


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
    from train.checkpoint import CheckpointError, check_shapes, read_meta, resolve_checkpoint, torch_load
    from train.data import get_tokenizer

    try:
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 0")
        ckpt = resolve_checkpoint(args.ckpt)
        meta = read_meta(ckpt)
        if meta["format"] != "torch":
            raise CheckpointError(f"{ckpt} is a {meta['format']!r} checkpoint; convert it first with "
                                  f"python -m train.export (train.sample reads 'torch' checkpoints)")
        tok_name = args.tokenizer
        run_cfg = ckpt.parent.parent / "config.yaml"
        if tok_name is None and run_cfg.is_file():
            from omegaconf import OmegaConf

            tok_name = OmegaConf.load(run_cfg).get("data", {}).get("tokenizer")
        tok = get_tokenizer(tok_name or "gpt2")
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        cfg = GPTConfig.from_dict(meta["model_config"])
        with torch.device("meta"):
            model = GPT(cfg)
        state = torch_load(ckpt / "model.pt")
        check_shapes({k: v.shape for k, v in model.state_dict().items()}, state, f"checkpoint {ckpt}")
        model.to_empty(device=device)
        model.load_state_dict(state)
        model.tie_weights()
        model.init_buffers()
        model.eval()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    ids = tok.encode(args.prompt) or [tok.eot_token]
    for i in range(args.num_samples):
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=gen)
        text = tok.decode(out[0].tolist())
        if args.num_samples > 1:
            print(f"--- sample {i + 1} (step {meta['step']}) ---")
        print(text)
    print(json.dumps({"checkpoint": str(ckpt), "step": meta["step"]}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
