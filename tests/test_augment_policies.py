"""augment=randaugment|trivialaugment|autoaugment: torchvision v2's automatic policies on the training images,
never on the eval images, and a run that uses them trains (the feature cache rightly stays off)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from transfer_cli.data.transforms import eval_transform, is_deterministic, resolve_preprocessing, train_transform
from transfer_cli.models.model import build_model
from transfer_cli.training.run import train

from conftest import FAST, compose_train


POLICY_CLASS = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide,
                "autoaugment": v2.AutoAugment}


@pytest.mark.parametrize("policy", list(POLICY_CLASS))
def test_the_policy_runs_on_training_images_only(policy: str) -> None:
    cfg = compose_train(["experiment=smoke", f"augment={policy}"])
    assert cfg.augment.policy == policy and not is_deterministic(cfg.augment)
    model = build_model(cfg.backbone, cfg.head, 3, pretrained=False)
    pre = resolve_preprocessing(model.preprocessing, cfg.transforms, model.pretrained)
    train_tf, eval_tf = train_transform(pre, cfg.augment), eval_transform(pre)
    assert [type(t) for t in train_tf.transforms].count(POLICY_CLASS[policy]) == 1
    assert not [t for t in eval_tf.transforms if isinstance(t, tuple(POLICY_CLASS.values()))]
    image = Image.fromarray(torch.randint(0, 256, (48, 40, 3), dtype=torch.uint8).numpy())
    torch.manual_seed(0)
    views = {tuple(train_tf(image).flatten()[:64].tolist()) for _ in range(4)}
    assert len(views) > 1 and train_tf(image).shape == eval_tf(image).shape == (3, 32, 32)


def test_a_run_with_randaugment_trains_and_says_why_the_cache_is_off(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="transfer_cli.training.assemble"):
        summary = train(compose_train(FAST + ["augment=randaugment", "strategy=feature_extract",
                                              "trainer.epochs=1"]), tmp_path)
    assert summary["status"] == "finished"
    assert any("augment=randaugment is random" in r.getMessage() for r in caplog.records)
