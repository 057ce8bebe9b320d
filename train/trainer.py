"""The training loop: micro-steps with gradient accumulation, optimizer steps, logging, eval,
samples, checkpoints, signals and non-finite losses. Everything parallel sits behind ``Engine``
(train/parallel/engine.py): the loop never reads a backend's internals nor branches on its name.

Host syncs: one per optimizer step (the finite-gradient check in ``Engine.step``), the
all-reduced stop flag (a CPU tensor) when distributed, and the log/eval steps. Micro-steps never
call ``.item()``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from train.checkpoint import Checkpointer, latest_checkpoint, rng_state, set_rng_state
from train.distributed import DistInfo, any_rank
from train.metrics import MetricsLogger, format_line, memory_gb, peak_flops
from train.ops.errors import EXIT_INTERRUPTED, EXIT_NAN, EXIT_OK, EXIT_PREEMPTED
from train.ops.profiler import StepProfiler, region
from train.ops.spike import OK, ROLLBACK, SpikeGuard
from train.ops.straggler import find_straggler, gather_times
from train.ops.watchdog import HangWatchdog
from train.sample import generate_text

log = logging.getLogger("train")


class StopTraining(Exception):
    """Ends the loop early with an exit code and a one-line message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class SignalFlag:
    """SIGTERM / SIGUSR1 / SIGINT set a flag (handled at the next step boundary, not mid-step: the step
    finishes and a checkpoint is written). A second SIGINT (Ctrl-C twice) aborts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
        if self.signum is None or signum == signal.SIGINT:
            self.signum, self.received_at = signum, time.time()
            if signum == signal.SIGINT:
                print("\nSIGINT: finishing this step and saving a checkpoint (Ctrl-C again aborts at once)",
                      file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, cfg, spec, run_dir: Path, dist: DistInfo, engine, tokenizer, train_loader,
                 val_loader) -> None:
        self.cfg, self.spec, self.run_dir, self.dist, self.engine = cfg, spec, Path(run_dir), dist, engine
        self.tok, self.train_loader, self.val_loader = tokenizer, train_loader, val_loader
        self.resumed_from: Path | None = None
        t = cfg.train
        # every data-parallel replica reads its own samples; tensor-parallel ranks of one replica share them
        self.tokens_per_step = t.micro_batch_size * t.grad_accum * t.seq_len * spec.dims.dp_size
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0  # training wall time of earlier (resumed) segments
        self.nan_skips = 0
        # global samples drawn from the loader (trained on or skipped): the data position the spike guard's
        # skipped ranges [start, end) refer to
        self.global_batch = t.micro_batch_size * t.grad_accum * spec.dims.dp_size
        self.samples = 0
        self.skip_ranges: list[list[int]] = []
        self.rollbacks = 0
        self.guard = SpikeGuard(t.spike) if t.spike.enabled else None
        self._step_starts: dict[int, int] = {}  # step -> its first global sample (recent steps)
        self.watchdog: HangWatchdog | None = None
        self.profiler = StepProfiler(t.profile, self.run_dir, dist.rank, dist.device)
        self._times = [0.0, 0.0, 0]  # since the last log: local step seconds, data-wait seconds, steps
        self.wandb_id: str | None = None
        self.signals = SignalFlag()
        self.logger: MetricsLogger | None = None
        self._trace = None
        self.ckpt = Checkpointer(engine, self.run_dir, model_config=spec.gpt_config.to_dict(),
                                 precision=cfg.precision.name, keep_last=t.keep_last, is_main=dist.is_main,
                                 async_save=cfg.checkpoint.async_save)
        if cfg.checkpoint.async_save and engine.format == "deepspeed" and dist.is_main:
            log.warning("checkpoint.async_save: DeepSpeed writes its own checkpoint format synchronously "
                        "(engine.save_checkpoint); saves under this strategy block the loop as before")

    # ------------------------------------------------------------ state

    def extra_state(self) -> dict:
        return {"trainer": {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed + self._seg_time(),
                            "nan_skips": self.nan_skips, "wandb_id": self.wandb_id, "samples": self.samples,
                            "skip_ranges": [list(r) for r in self.skip_ranges], "rollbacks": self.rollbacks,
                            "spike": self.guard.state_dict() if self.guard is not None else None},
                "data": self.train_loader.state_dict(), "rng": rng_state()}

    def load_extra(self, extra: dict) -> None:
        tr = extra["trainer"]
        self.step, self.tokens, self.elapsed = int(tr["step"]), int(tr["tokens"]), float(tr["elapsed"])
        self.nan_skips, self.wandb_id = int(tr["nan_skips"]), tr.get("wandb_id")
        self.samples = int(tr.get("samples", self.step * self.global_batch))  # older checkpoints: no skipped data
        self.skip_ranges = [list(map(int, r)) for r in tr.get("skip_ranges", [])]
        self.rollbacks = int(tr.get("rollbacks", 0))
        if self.guard is not None and tr.get("spike") is not None:
            self.guard.load_state_dict(tr["spike"])
        self.train_loader.load_state_dict(extra["data"])
        set_rng_state(extra["rng"])

    def resume(self, ckpt_dir: Path) -> None:
        """Collective: restore model, optimizer, scheduler, scaler (engine) and trainer/data/RNG state."""
        from train.checkpoint import load_checkpoint

        self.load_extra(load_checkpoint(self.engine, ckpt_dir))
        self.resumed_from = Path(ckpt_dir)
        if self.dist.is_main:
            log.info(f"resumed from {ckpt_dir} at step {self.step} ({self.tokens:,} tokens)")

    def _seg_time(self) -> float:
        return time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0

    # ------------------------------------------------------------ pieces

    def evaluate(self, loader=None) -> float:
        """Mean val loss over ``train.eval_steps`` micro-batches per rank, averaged over ranks."""
        with torch.random.fork_rng(devices=[]):  # eval must not move the training RNG stream
            return self._evaluate(self.val_loader if loader is None else loader)

    def _evaluate(self, loader) -> float:
        total = torch.zeros((), device=self.dist.device)
        n = 0
        for i, (x, y) in enumerate(loader):
            if i >= self.cfg.train.eval_steps:
                break
            x, y = x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)
            total += self.engine.eval_loss(x, y)
            n += 1
        return self.engine.dp_mean(total / max(n, 1)).item()

    def sample(self) -> str:
        t = self.cfg.train
        return generate_text(self.engine, self.tok, t.sample_prompt, t.sample_tokens,
                             temperature=t.sample_temperature, top_k=t.sample_top_k, seed=t.seed + self.step)

    def save(self, wait: bool = True) -> Path:
        """Checkpoint this step. With ``checkpoint.async_save`` and ``wait=False`` the write goes on in the
        background (``latest`` moves to it once it is complete); otherwise it is complete on return."""
        fault = "enospc" if self.step in self.cfg.train.fault_enospc_steps else None  # test hook: disk full
        path = self.ckpt.save(self.step, self.extra_state(), wait=wait, fault=fault)
        if self.dist.is_main:
            if self.ckpt.in_flight == self.step:
                log.info(f"saving checkpoint {path} in the background (loop held {self.ckpt.last_stall_s:.2f} s)")
            else:
                log.info(f"saved checkpoint {path}")
        return path

    def _log_eval(self) -> float:
        val = self.evaluate()
        event = {"step": self.step, "val_loss": val}
        for label, loader in getattr(self.val_loader, "sources", {}).items():  # data.mixture: per source
            event[f"val_loss/{label}"] = self.evaluate(loader)
        if self.logger is not None:
            self.logger.log(event)
            self.logger.plot()
            log.info(f"step {self.step:>6} | val loss {val:.4f} | val ppl {math.exp(min(val, 50)):.2f}")
        return val

    def _log_sample(self) -> None:
        try:
            text = self.sample()
        except Exception as e:  # noqa: BLE001 - a sample is a courtesy: it never ends the run
            if self.dist.is_main:
                log.warning(f"step {self.step}: text sample failed ({type(e).__name__}: {e}); training continues")
            return
        if self.logger is not None:
            log.info(f"sample at step {self.step}:\n{self.cfg.train.sample_prompt}{text}\n" + "-" * 60)
            self.logger.sample(self.step, self.cfg.train.sample_prompt, text)

    def _trace_batch(self, x: torch.Tensor, micro: int) -> None:
        """Test hook: which samples this rank saw (hash of each sequence)."""
        if self._trace is None:
            (self.run_dir / "trace").mkdir(exist_ok=True)
            self._trace = open(self.run_dir / "trace" / f"rank{self.dist.rank}.jsonl", "a")  # noqa: SIM115
        hashes = [hashlib.sha1(row.cpu().numpy().tobytes()).hexdigest()[:16] for row in x]
        self._trace.write(json.dumps({"step": self.step + 1, "micro": micro, "samples": hashes}) + "\n")
        self._trace.flush()

    # ------------------------------------------------------------ the loop

    def fit(self) -> int:
        """Train to ``train.max_steps`` (or a signal / NaN stop). Returns the process exit code."""
        cfg, t, dist = self.cfg, self.cfg.train, self.dist
        if dist.is_main:
            self.logger = MetricsLogger(self.run_dir, cfg, resume_step=self.step if self.resumed_from else None,
                                        wandb_id=self.wandb_id)
            self.wandb_id = self.logger.wandb_id
        flops_per_token = _flops_per_token(self.spec.gpt_config, t.seq_len)
        peak, peak_src = peak_flops(dist.device, self.engine.precision.param_dtype)
        if dist.is_main:
            log.info(f"MFU reference: {peak / 1e12:.3g} TFLOP/s per device ({peak_src}); "
                     f"{flops_per_token / 1e6:.2f} MFLOP/token; {self.tokens_per_step:,} tokens/step")
        self.signals.install()
        if t.hang_timeout_s > 0:
            self.watchdog = HangWatchdog(self.run_dir, dist.rank, dist.world_size, t.hang_timeout_s).start(self.step)
        code, message = EXIT_OK, None
        try:
            if self.step == 0 and t.eval_steps > 0:
                self._log_eval()
            code = self._loop(flops_per_token, peak)
        except StopTraining as stop:
            code, message = stop.code, str(stop)
            self.ckpt.wait()  # every rank stops here together: the save in flight completes and is published
        finally:
            self.signals.restore()
            if self.watchdog is not None:
                self.watchdog.stop()
            self.profiler.finish()
            if self._trace is not None:
                self._trace.close()
        if dist.is_main and self.logger is not None:
            self.logger.summary({"final_step": self.step, "tokens": self.tokens})
            self.logger.plot()
            self.logger.close()
            log.info(f"metrics: {self.logger.path} | loss curve: {self.logger.plot_path}")
        if message is not None and dist.is_main:
            print(message, file=sys.stderr, flush=True)
        return code

    def _loop(self, flops_per_token: float, peak: float) -> int:
        t, dist, engine = self.cfg.train, self.dist, self.engine
        device = dist.device
        nan_steps = {int(s) for s in t.fault_nan_steps}
        self._it = iter(self.train_loader)
        self._t0 = time.perf_counter()
        t_log, tokens_log = self._t0, self.tokens
        loss_sum = torch.zeros((), device=device)  # summed step losses since the last log (on device)
        n_sum = 0
        last_val: float | None = None
        while self.step < t.max_steps:
            t_step = time.perf_counter()
            self.profiler.step_begins(self.step + 1)
            self._phase("data")
            if t.fault_stall_rank == dist.rank and self.step + 1 == 2:  # fault injection: a hung peer
                _stall_in_step(3 * self.cfg.strategy.timeout_s + 5)
            self._skip_bad_data()
            start = self.samples
            corrupt = _overlaps(start, start + self.global_batch, t.fault_corrupt_samples)  # fault injection
            step_loss = torch.zeros((), device=device)
            for micro in range(t.grad_accum):
                # the loader may draw from torch's global RNG (DataLoader base seed); keep that off the
                # training stream (dropout) so a resumed run replays it exactly
                self._phase("data")
                t_data = time.perf_counter()
                with region("data_wait"), torch.random.fork_rng(devices=[]):
                    x, y = next(self._it)
                self._times[1] += time.perf_counter() - t_data
                self._phase("forward-backward")
                if corrupt:  # fault injection (train.fault_corrupt_samples): wrong targets, a loss spike
                    y = (y + 12345) % self.spec.gpt_config.vocab_size
                if t.trace_samples:
                    self._trace_batch(x, micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # fault injection (train.fault_nan_steps): a NaN loss, hence NaN gradients, as after an overflow
                poison = self.step + 1 in nan_steps
                with region("forward_backward"):
                    step_loss += engine.micro_step(x, y, last=micro == t.grad_accum - 1, poison=poison)
            verdict, score, spike_loss = OK, 0.0, 0.0
            if self.guard is not None:  # judged before the update: a spike's update is skipped
                spike_loss = engine.dp_mean(step_loss.clone()).item()
                verdict, score = self.guard.check(self.step + 1, spike_loss)
                if verdict != OK:  # NaN gradients: the engine skips the update like a non-finite step
                    engine.skip_update(x, y)
            self._phase("optimizer")
            with region("optimizer"):
                stats = engine.step()
            grad_norm, skipped, lr = stats.grad_norm, stats.skipped, stats.lr
            self.step += 1
            self.tokens += self.tokens_per_step
            self.samples = start + self.global_batch
            self._step_starts[self.step] = start
            self._step_starts.pop(self.step - 4 * t.spike.repeat_window - 8, None)
            if verdict != OK:
                self._log_spike(spike_loss, score, verdict)
                if verdict == ROLLBACK:
                    self._rollback()
                    loss_sum.zero_()
                    n_sum = 0
                    t_log, tokens_log = time.perf_counter(), self.tokens
                    continue
            elif skipped:
                self._handle_skip(step_loss)
            else:
                self.nan_skips = 0
                loss_sum += step_loss
                n_sum += 1
            if t.fault_slow_rank == dist.rank:  # fault injection: a slow rank (every step takes fault_slow_s longer)
                time.sleep(t.fault_slow_s)
            self._times[0] += time.perf_counter() - t_step  # this rank's arrival at the step's meeting point
            self._times[2] += 1
            self._phase("sync")
            with region("sync"):
                stop = any_rank(self.signals.signum is not None)
            self.profiler.step_ends(self.step)
            if self.watchdog is not None:
                self.watchdog.completed(self.step)
            final = self.step == t.max_steps
            if self.step % t.log_every == 0 or final or stop:
                now = time.perf_counter()
                # the global-batch mean: the mean over data-parallel replicas of each replica's mean
                loss = engine.dp_mean(loss_sum / max(n_sum, 1)).item() if n_sum else float("nan")
                tps = (self.tokens - tokens_log) / max(now - t_log, 1e-9)
                event = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                         "tokens": self.tokens, "tokens_per_s": tps,
                         "mfu": tps * flops_per_token / (peak * dist.world_size),
                         "mem_gb": memory_gb(device), "time": self.elapsed + (now - self._t0)}
                event.update(getattr(self.train_loader, "metrics", dict)())  # data.mixture: tokens/epochs per source
                self._phase("log")
                event.update(self._stragglers())
                if self.logger is not None:
                    self.logger.log(event)
                    log.info(format_line(event))
                loss_sum.zero_()
                n_sum = 0
                t_log, tokens_log = time.perf_counter(), self.tokens
            if ((t.eval_every and self.step % t.eval_every == 0) or final) and t.eval_steps > 0:
                self._phase("eval")
                last_val = self._log_eval()
            if ((t.sample_every and self.step % t.sample_every == 0) or final) and t.sample_tokens > 0:
                self._phase("sample")
                self._log_sample()
            self._phase("checkpoint")
            self.ckpt.poll()  # publish a background save whose write finished (collective)
            if (t.ckpt_every and self.step % t.ckpt_every == 0) or final or stop:
                self.save(wait=final or stop)
            if stop:
                return self._preempted()
            if t.fault_error_step == self.step:  # fault injection: a bug (not bad input) in the middle of a run
                raise ValueError(f"injected internal error at step {self.step} (train.fault_error_step)")
        if dist.is_main:
            figures = f"final: step {self.step}, {self.tokens:,} tokens, {self.elapsed + self._seg_time():.1f} s"
            if last_val is not None:
                figures += f", val loss {last_val:.4f} (ppl {math.exp(min(last_val, 50)):.2f})"
            log.info(figures)
        return EXIT_OK

    def _phase(self, name: str) -> None:
        if self.watchdog is not None:
            self.watchdog.phase(name)

    def _stragglers(self) -> dict:
        """Collective at log steps (distributed runs): name a rank much slower than the median (train/ops/straggler.py)."""
        ratio_limit = self.cfg.train.straggler_ratio
        step_s, data_s, n = self._times
        self._times = [0.0, 0.0, 0]
        if not self.dist.enabled or ratio_limit <= 0:
            return {}
        times = gather_times(step_s, data_s, n)
        slow, ratio = find_straggler(times, ratio_limit)
        if slow is not None and self.dist.is_main:
            log.warning(f"step {self.step}: straggler: rank {slow} takes {times[slow][0]:.3f} s per step, {ratio:.1f}x "
                        f"the median of the other ranks (data wait {times[slow][1]:.3f} s per step; "
                        f"train.straggler_ratio={ratio_limit:g})")
        return {"straggler_rank": slow, "straggler_ratio": ratio}

    # ------------------------------------------------------------ loss spikes (train/ops/spike.py)

    def _skip_bad_data(self) -> None:
        """Draw and drop the micro-batches of every step whose samples lie in a range a rollback skipped."""
        while _overlaps(self.samples, self.samples + self.global_batch, *self.skip_ranges):
            for _ in range(self.cfg.train.grad_accum):
                with torch.random.fork_rng(devices=[]):
                    next(self._it)
            self.samples += self.global_batch

    def _log_spike(self, loss: float, score: float, verdict: str) -> None:
        s = self.cfg.train.spike
        if self.dist.is_main:
            what = "z-score" if s.method == "zscore" else "ratio to the EMA"
            log.warning(f"step {self.step}: loss spike (loss {loss:.4f}, {what} {score:.1f} > {s.threshold}): update "
                        f"skipped ({len(self.guard.spikes)}/{s.repeat} within {s.repeat_window} steps)")
            self.logger.log({"step": self.step, "event": "spike", "spike_loss": loss, "spike_score": score})

    def _rollback(self) -> None:
        """Repeated spikes: back to the last checkpoint, skipping the samples from the first spike to now."""
        s = self.cfg.train.spike
        first = self.guard.first_recent_spike()
        bad = [self._step_starts.get(first, self.samples - self.global_batch), self.samples]
        last = latest_checkpoint(self.run_dir)
        if self.rollbacks >= s.max_rollbacks or last is None:
            why = (f"after {self.rollbacks} rollback(s) (train.spike.max_rollbacks={s.max_rollbacks})"
                   if last is not None else "and there is no checkpoint to roll back to")
            raise StopTraining(EXIT_NAN, f"error: step {self.step}: loss spikes repeated ({len(self.guard.spikes)} "
                                         f"within {s.repeat_window} steps) {why}; stopped. Last good checkpoint: "
                                         f"{last if last is not None else 'none'}")
        self.ckpt.wait()
        last = latest_checkpoint(self.run_dir)
        at, ranges, rollbacks = self.step, [*self.skip_ranges, bad], self.rollbacks + 1
        self.resume(last)
        self.skip_ranges, self.rollbacks = ranges, rollbacks
        self.guard.clear_spikes()
        self._it = iter(self.train_loader)
        if self.dist.is_main:
            log.warning(f"step {at}: loss spikes repeated: rolled back to {last.name} (step {self.step}) and skipping "
                        f"global samples [{bad[0]}, {bad[1]}) (rollback {rollbacks}/{s.max_rollbacks})")
            self.logger.rollback(self.step, {"step": at, "event": "rollback", "to_step": self.step,
                                             "skip_samples": bad, "rollbacks": rollbacks})
        # the checkpoint rolled back to is written again with the skipped range in its state: a crash and resume
        # from it never replays the bad samples
        self.save(wait=True)

    def _handle_skip(self, step_loss: torch.Tensor) -> None:
        """A step whose gradients were not finite was skipped. With loss scaling that is routine
        (the scale was too high) unless the loss itself is not finite."""
        loss_bad = any_rank(not bool(torch.isfinite(step_loss)))
        if self.engine.loss_scaling and not loss_bad:
            return
        self.nan_skips += 1
        if self.dist.is_main:
            log.warning(f"step {self.step}: non-finite loss/gradients, update skipped "
                        f"({self.nan_skips}/{self.cfg.train.max_nan_skips} in a row)")
        if self.nan_skips >= self.cfg.train.max_nan_skips:
            last = latest_checkpoint(self.run_dir)
            raise StopTraining(EXIT_NAN, f"error: step {self.step}: loss not finite for {self.nan_skips} steps in a "
                                         f"row (train.max_nan_skips={self.cfg.train.max_nan_skips}); stopped. Last "
                                         f"good checkpoint: {last if last is not None else 'none'}")

    def _preempted(self) -> int:
        took = time.time() - (self.signals.received_at or time.time())
        code = EXIT_INTERRUPTED if self.signals.signum == signal.SIGINT else EXIT_PREEMPTED
        if self.dist.is_main:
            name = signal.Signals(self.signals.signum).name if self.signals.signum else "a signal on another rank"
            log.warning(f"received {name}: finished step {self.step}, saved a checkpoint, exiting with code "
                        f"{code} ({took:.1f} s from signal to exit)")
        return code


def _stall_in_step(seconds: float) -> None:
    """Fault injection (train.fault_stall_rank): this rank stops making progress inside a step (a named function,
    so the hang watchdog's stack file shows where it is)."""
    time.sleep(seconds)


def _overlaps(start: int, end: int, *ranges) -> bool:
    """True when [start, end) overlaps any [a, b) of ``ranges`` (empty ranges and lists never do)."""
    return any(len(r) == 2 and start < int(r[1]) and int(r[0]) < end for r in ranges)


def _flops_per_token(gpt_config, seq_len: int) -> float:
    from model.stats import flops_per_token

    return float(flops_per_token(gpt_config, seq_len))
