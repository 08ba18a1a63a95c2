"""A checkpoint's config fingerprint against the config a resume runs under: a section the saving version did not
have yet counts as unchanged at its default, and as changed at any other value."""

from __future__ import annotations

import json

import pytest

from recipes.config import ConfigError, load_config
from recipes.megatron import checkpointing
from recipes.resume import FINGERPRINT, check_fingerprint, config_fingerprint
from recipes.trainer import SFTConfig


def saved_without_peft(tmp_path, step=2):
    values = {k: v for k, v in config_fingerprint(SFTConfig())["config"].items() if not k.startswith("peft.")}
    folder = checkpointing.step_dir(tmp_path, step)
    folder.mkdir(parents=True)
    (folder / FINGERPRINT).write_text(json.dumps({"step": step, "config": values}))
    return tmp_path


def test_a_section_newer_than_the_checkpoint_counts_at_its_default_only(tmp_path):
    ckpt = saved_without_peft(tmp_path)
    check_fingerprint(SFTConfig(), ckpt, 2)  # peft.lora.* at their defaults: the same computation
    with pytest.raises(ConfigError, match=r"peft.lora.enabled: '\(unset\)' -> True"):
        check_fingerprint(load_config(SFTConfig, None, ["peft.lora.enabled=true"]), ckpt, 2)
    with pytest.raises(ConfigError, match=r"training.lr: 0.0015 -> 0.1"):  # a key both know still counts
        check_fingerprint(load_config(SFTConfig, None, ["training.lr=0.1"]), ckpt, 2)
