"""Tests for study.model: freezing, weights loading, pickling, reproducibility."""

from __future__ import annotations

import pickle
import time

import pytest
import torch
from torch import nn

from study import model as model_mod
from study.model import ThighResNet, build_model, seed_everything, trainable_parameters


def _trainable_prefixes(m: ThighResNet) -> set[str]:
    return {name.split(".")[1] for name, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "freeze, expected",
    [
        ("fc", {"fc"}),
        ("layer4", {"layer4", "fc"}),
        ("layer3", {"layer3", "layer4", "fc"}),
        ("none", {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}),
    ],
)
def test_freeze_modes_train_exactly_the_named_parts(freeze, expected):
    m = build_model(freeze=freeze)
    assert _trainable_prefixes(m) == expected
    n_expected = sum(
        p.numel() for name, p in m.named_parameters() if name.split(".")[1] in expected
    )
    assert sum(p.numel() for p in trainable_parameters(m)) == n_expected
    m.train()
    for name, mod in m.backbone.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert mod.training == (name.split(".")[0] in expected), name
    m.eval()
    assert not any(mod.training for mod in m.modules())


def test_frozen_batchnorm_keeps_running_stats_during_training_step():
    m = build_model(freeze="layer4")
    before = m.backbone.layer1[0].bn1.running_mean.clone()
    trained_before = m.backbone.layer4[0].bn1.running_mean.clone()
    m.train()
    m(torch.rand(4, 1, 32, 64)).sum().backward()
    assert torch.equal(m.backbone.layer1[0].bn1.running_mean, before)
    assert not torch.equal(m.backbone.layer4[0].bn1.running_mean, trained_before)
    assert m.backbone.conv1.weight.grad is None
    assert m.backbone.fc.weight.grad is not None


def test_bad_freeze_names_value_and_allowed():
    with pytest.raises(ValueError, match=r"'layer2'.*fc, layer4, layer3, none"):
        build_model(freeze="layer2")


def test_forward_shape_and_grayscale_contract():
    m = build_model(num_classes=2).eval()
    assert m(torch.rand(3, 1, 32, 64)).shape == (3, 2)
    with pytest.raises(ValueError, match="expects"):
        m(torch.rand(3, 3, 32, 64))


def test_imagenet_offline_raises_instructive_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    # the real download path also fails fast here; patching keeps the test offline-proof
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    t0 = time.time()
    with pytest.raises(RuntimeError) as err:
        build_model(weights="imagenet")
    message = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "resnet18-f37072fd.pth" in message
    assert "weights: /path/to/" in message
    assert time.time() - t0 < 10


def test_imagenet_loads_from_cache_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision_resnet18_state()
    cache = model_mod.imagenet_cache_file()
    assert cache == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cache.parent.mkdir(parents=True)
    torch.save(reference, cache)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("downloaded"))
    m = build_model(weights="imagenet", freeze="fc")
    assert torch.equal(m.backbone.conv1.weight, reference["conv1.weight"])
    assert m.backbone.fc.out_features == 2


def torchvision_resnet18_state() -> dict[str, torch.Tensor]:
    from torchvision.models import resnet18

    torch.manual_seed(123)
    return resnet18(weights=None).state_dict()  # 1000-class fc, like the ImageNet file


def test_path_weights_round_trip(tmp_path):
    seed_everything(1)
    a = build_model(freeze="layer4")
    path = tmp_path / "model.pth"
    torch.save(a.state_dict(), path)
    seed_everything(2)
    b = build_model(weights=str(path), freeze="layer4")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_path_weights_plain_torchvision_file_skips_imagenet_fc(tmp_path):
    ref = torchvision_resnet18_state()
    path = tmp_path / "resnet18.pth"
    torch.save(ref, path)
    m = build_model(weights=str(path))
    assert torch.equal(m.backbone.layer2[0].conv1.weight, ref["layer2.0.conv1.weight"])
    assert m.backbone.fc.weight.shape == (2, 512)


def test_path_weights_missing_or_mismatched(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model(weights=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(3, 3), "something": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="does not match resnet18"):
        build_model(weights=str(bad))
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable state dict"):
        build_model(weights=str(junk))


def test_model_pickles_and_loads_as_same_class():
    m = build_model(freeze="layer3").eval()
    x = torch.rand(2, 1, 32, 64)
    back = pickle.loads(pickle.dumps(m))
    assert type(back) is ThighResNet and back.freeze == "layer3"
    assert torch.equal(back(x), m(x))
    back.train()
    assert not back.backbone.layer1[0].bn1.training and back.backbone.layer3[0].bn1.training


def _short_training(seed: int) -> dict[str, torch.Tensor]:
    seed_everything(seed)
    m = build_model(freeze="none")
    opt = torch.optim.SGD(trainable_parameters(m), lr=0.01, momentum=0.9)
    x = torch.rand(8, 1, 32, 32)
    y = torch.randint(0, 2, (8,))
    m.train()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.state_dict()


def test_seed_everything_makes_training_bit_reproducible():
    a, b, c = _short_training(7), _short_training(7), _short_training(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["backbone.fc.weight"], c["backbone.fc.weight"])


def test_our_resnet18_is_torchvisions_module_for_module_and_bit_for_bit():
    """study/resnet18.py replaces torchvision's resnet18 (to spare every trial worker the import):
    same modules in the same order, the same weights from the same seed, the same forward, the
    same ImageNet file URL, and state dicts that load both ways."""
    import torchvision
    from torchvision.models import ResNet18_Weights

    from study.resnet18 import IMAGENET1K_V1_URL, resnet18

    assert IMAGENET1K_V1_URL == ResNet18_Weights.IMAGENET1K_V1.url
    torch.manual_seed(3)
    ours = resnet18()
    after_ours = torch.rand(1)
    torch.manual_seed(3)
    theirs = torchvision.models.resnet18(weights=None)
    assert torch.equal(after_ours, torch.rand(1))  # the same RNG draws, in the same order
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert [type(m).__name__ for m in ours.modules()][1:] == [type(m).__name__ for m in theirs.modules()][1:]
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    assert all(torch.equal(sd_ours[k], sd_theirs[k]) for k in sd_ours)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        for mode in (False, True):  # eval (running stats) and train (batch stats)
            ours.train(mode)
            theirs.train(mode)
            assert torch.equal(ours(x), theirs(x))
    torch.manual_seed(4)
    theirs.load_state_dict(torchvision.models.resnet18(weights=None).state_dict())
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_building_a_model_does_not_import_torchvision():
    import subprocess
    import sys

    code = ("import sys; from study.model import build_model; build_model(weights='none', freeze='fc'); "
            "import study.batch_trial, study.search; print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
