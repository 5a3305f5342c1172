"""Grad-CAM / gradient saliency: overlays on stored slices, and maps that follow the evidence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from store_helpers import synthetic_oai_store

from study.model import ThighResNet, build_model
from study.saliency import grad_cam, input_gradient, sample_subjects, saliency_report


class RegionOnly(ThighResNet):
    """A ThighResNet that sees only the columns in ``region`` (everything else is zeroed)."""

    def __init__(self, backbone, region: torch.Tensor):
        super().__init__(backbone)
        self.register_buffer("region", region)

    def forward(self, x):
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        return self.backbone(x * self.region)


def region_model(cols: slice, shape=(64, 256)) -> RegionOnly:
    torch.manual_seed(0)
    region = torch.zeros(1, 1, *shape)
    region[..., cols] = 1
    model = RegionOnly(build_model().backbone, region)
    with torch.no_grad():  # class 1 rises with every pooled feature, so its CAM is not ReLU'd away
        model.backbone.fc.weight[1] = model.backbone.fc.weight[1].abs()
    return model


@pytest.mark.parametrize("cols", [slice(0, 64), slice(128, 192)])
def test_grad_cam_concentrates_on_the_region_the_output_depends_on(cols):
    model = region_model(cols)
    x = torch.rand(2, 1, 64, 256, generator=torch.Generator().manual_seed(1))
    cam = grad_cam(model, x, target=torch.ones(2))
    assert cam.shape == (2, 64, 256) and (cam >= 0).all()
    share = cam[..., cols].sum() / cam.sum()
    assert share > 0.4, f"{share:.2f} of the map on a region of 25% of the image"
    peak_cols = [np.unravel_index(m.argmax(), m.shape)[1] for m in cam]
    assert all(cols.start <= c < cols.stop for c in peak_cols)
    assert all(p.grad is None for p in model.parameters())  # no stray grads left on the model


def test_input_gradient_is_zero_outside_the_region():
    model = region_model(slice(0, 64))
    g = input_gradient(model, torch.rand(1, 1, 64, 256), target=torch.ones(1))
    assert g[..., 64:].max() == 0 and g[..., :64].max() > 0


def test_sample_subjects_is_two_per_class_and_deterministic():
    rows = np.array([9, 3, 7, 1, 5, 8])
    labels = np.array([1, 0, 1, 0, 0, 1])
    picked = sample_subjects(rows, labels, 4)
    assert sorted(rows[picked].tolist()) == [1, 3, 7, 8]
    assert np.array_equal(picked, sample_subjects(rows, labels, 4))
    one_high = sample_subjects(rows, np.array([1, 0, 0, 0, 0, 0]), 4)  # a short class gives way
    assert labels.size and sorted(rows[one_high].tolist()) == [1, 3, 5, 9]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from data_prep.store import open_store

    return open_store(synthetic_oai_store(tmp_path_factory.mktemp("sal"), subjects=6, seed=2, size="64x128",
                                          salt="saliency-test-salt-0123456789"))


@pytest.mark.parametrize("method", ["gradcam", "gradient"])
def test_saliency_report_writes_overlays(store, tmp_path, method):
    import matplotlib.image

    torch.manual_seed(0)
    model = build_model()
    rows = np.arange(len(store.subjects))
    labels = np.array([0, 1] * (rows.size // 2))
    probs = np.linspace(0.2, 0.8, rows.size)
    report = saliency_report(model, store, rows, labels, probs, out_dir=tmp_path / method,
                             input_size=(32, 64), method=method)
    assert len(report["paths"]) == 4 and all(p.is_file() and p.suffix == ".png" for p in report["paths"])
    names = sorted(p.name for p in report["paths"])
    assert sum("true-low" in n for n in names) == 2 and sum("true-high" in n for n in names) == 2
    png = matplotlib.image.imread(report["paths"][0])
    assert png.ndim == 3 and png.shape[2] in (3, 4) and png.shape[1] > png.shape[0]  # two thighs: wide
    maps = report["heatmaps"]
    assert maps.shape == (4, 64, 128) and all(m.std() > 0 for m in maps)  # at stored size, not flat
    assert 0 <= report["periphery_fraction"] <= 1 and 0 < report["periphery_area_fraction"] < 1
    with pytest.raises(ValueError, match="Only gradcam, gradient"):
        saliency_report(model, store, rows, labels, probs, out_dir=tmp_path, method="lime")
