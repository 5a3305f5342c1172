"""A stand-in for data_prep.store's reader, shared by the study tests that need no real Zarr."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class FakeStore:
    """Only the attributes the study code may use (see ARCHITECTURE.md)."""

    images: np.ndarray
    subjects: pd.DataFrame
    recipe: dict = field(default_factory=dict)
    measures: dict = field(default_factory=dict)
    content_hash: str = "sha256:fake"

    def subject_images(self, i: int) -> np.ndarray:
        row = self.subjects.iloc[i]
        return self.images[row.slice_start : row.slice_start + row.slice_count]
