"""Worker for tests/test_megatron_checkpoint.py: kill a save half-way, then resume; resume from damaged steps.

  checkpoint_faults.py kill     CKPT REPORT  train 1 step, save step 1, then save step 2 and SIGKILL itself right
                                             after the shards are written (before the step is published)
  checkpoint_faults.py resume   CKPT REPORT  load the latest step, report it, then save steps 2..4 (keep_last=2)
  checkpoint_faults.py prepare  CKPT REPORT  train and save steps 1 and 2 (extra: RNG states, rows consumed)
  checkpoint_faults.py resave   CKPT REPORT  load step 2, train a step, re-save step 2 and SIGKILL itself after
                                             the new copy is written and hashed, right before it is published
  checkpoint_faults.py continue REPORT DIR[@STEP] ...
                                             per folder: a fresh model loads it (STEP, else the newest usable step),
                                             reports the step, the warnings and the weights, then trains on to step
                                             3 saving every step (as the trainer does) and reports the weights again
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.megatron import checkpointing, providers, runtime  # noqa: E402
from recipes.megatron import train_step as ts  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "recipes/assets/models/tiny-llama3/config.json"
S = 16


def batch() -> list[dict]:
    tok = torch.randint(0, 262, (2, S + 1), generator=torch.Generator().manual_seed(3))
    return [{"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(2, S),
             "position_ids": torch.arange(S).expand(2, S)}]


def weights(chunks) -> str:
    h = hashlib.sha256()
    for name, p in providers.unwrap(chunks)[0].named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def fresh(hf):
    chunks = providers.build_model(hf, 1, 1, seed=0)
    return chunks, ts.build_optimizer(chunks, lr=1e-3)


def save(ckpt: Path, step: int, chunks, optimizer) -> None:
    checkpointing.save_checkpoint(ckpt, step, chunks, optimizer,
                                  extra={"rng": runtime.rng_state(), "consumed": 2 * step})


def prepare(ckpt: Path, report_path: Path, hf) -> None:
    chunks, optimizer = fresh(hf)
    report = {}
    for step in (1, 2):
        ts.optimizer_step(chunks, optimizer, batch(), S)
        save(ckpt, step, chunks, optimizer)
        report[f"weights_at_{step}"] = weights(chunks)
    report_path.write_text(json.dumps(report))


def resave(ckpt: Path, hf) -> None:
    chunks, optimizer = fresh(hf)
    assert checkpointing.load_checkpoint(ckpt, chunks, optimizer)[0] == 2
    ts.optimizer_step(chunks, optimizer, batch(), S)  # different weights under the same step number

    def die(tmp, final):
        os.kill(os.getpid(), signal.SIGKILL)  # written, hashed and fsynced, not yet published

    checkpointing._publish = die
    save(ckpt, 2, chunks, optimizer)
    raise SystemExit("unreachable: the re-save should have been killed")


def resume_each(report_path: Path, specs: list[str], hf) -> None:
    import numpy as np

    report = {}
    for spec in specs:
        ckpt, _, step = spec.partition("@")
        chunks, optimizer = fresh(hf)
        r = report[ckpt] = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                loaded, extra = checkpointing.load_checkpoint(ckpt, chunks, optimizer, step=int(step) if step else None)
            except checkpointing.CorruptCheckpointError as err:
                r["error"] = str(err)
                continue
        r.update(step=loaded, consumed=extra["consumed"], weights_loaded=weights(chunks),
                 warnings=[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
                 numpy_rng_is_array=isinstance(extra["rng"]["numpy"][1], np.ndarray))
        runtime.set_rng_state(extra["rng"])
        for s in range(loaded + 1, 4):
            ts.optimizer_step(chunks, optimizer, batch(), S)
            save(Path(ckpt), s, chunks, optimizer)
        r["weights_final"] = weights(chunks)
        r["latest_after"] = checkpointing.latest_step(ckpt)
        r["problems_after"] = {s: checkpointing.verify_step(ckpt, s) for s in checkpointing.saved_steps(ckpt)}
        r["dirs_after"] = sorted(p.name for p in Path(ckpt).iterdir())
    report_path.write_text(json.dumps(report))


def main() -> None:
    mode = sys.argv[1]
    torch.set_num_threads(1)
    runtime.init_distributed(1, 1, seed=0)
    if mode in ("prepare", "resave", "continue"):
        hf = providers.load_hf_config(CONFIG)
        if mode == "prepare":
            prepare(Path(sys.argv[2]), Path(sys.argv[3]), hf)
        elif mode == "resave":
            resave(Path(sys.argv[2]), hf)
        else:
            resume_each(Path(sys.argv[2]), sys.argv[3:], hf)
        runtime.destroy_distributed()
        return
    ckpt, report_path = Path(sys.argv[2]), Path(sys.argv[3])
    hf = providers.load_hf_config(CONFIG)
    chunks = providers.build_model(hf, 1, 1, seed=0)
    optimizer = ts.build_optimizer(chunks, lr=1e-3)
    if mode == "kill":
        ts.optimizer_step(chunks, optimizer, batch(), S)
        loss = ts.forward_backward(chunks, batch(), S, forward_only=True)["loss"]
        checkpointing.save_checkpoint(ckpt, 1, chunks, optimizer, extra={"eval_loss": loss, "consumed": 2})
        report_path.write_text(json.dumps({"eval_loss_at_1": loss}))
        ts.optimizer_step(chunks, optimizer, batch(), S)
        from megatron.core import dist_checkpointing

        real_save = dist_checkpointing.save

        def save_then_die(*args, **kwargs):
            real_save(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)  # the shards of step 2 are on disk, nothing is published

        dist_checkpointing.save = save_then_die
        checkpointing.save_checkpoint(ckpt, 2, chunks, optimizer)
        raise SystemExit("unreachable: the save should have been killed")
    # resume
    report = {"latest_before": checkpointing.latest_step(ckpt),
              "dirs_before": sorted(p.name for p in ckpt.iterdir())}
    step, extra = checkpointing.load_checkpoint(ckpt, chunks, optimizer)
    report.update(step=step, extra=extra)
    report["eval_loss_loaded"] = ts.forward_backward(chunks, batch(), S, forward_only=True)["loss"]
    for s in (2, 3, 4):
        ts.optimizer_step(chunks, optimizer, batch(), S)
        checkpointing.save_checkpoint(ckpt, s, chunks, optimizer, keep_last=2)
    report["dirs_after"] = sorted(p.name for p in ckpt.iterdir())
    report["latest_after"] = checkpointing.latest_step(ckpt)
    report_path.write_text(json.dumps(report))
    runtime.destroy_distributed()


if __name__ == "__main__":
    main()
