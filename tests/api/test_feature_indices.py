import numpy as np
import pytest

from atlasvi.api.extras import feature_indices


def test_feature_indices_looks_up_names_then_ids_and_names_what_is_missing():
    names, ids = ("CD3E", "MS4A1", "LYZ"), ("ENSG1", "ENSG2", "ENSG3")
    assert feature_indices("genes", None, names, ids) is None
    assert feature_indices("genes", ["LYZ", "ENSG1", "MS4A1"], names, ids).tolist() == [2, 0, 1]
    assert feature_indices("proteins", [], ("CD3",)).dtype == np.int64  # an empty selection indexes no column
    with pytest.raises(KeyError, match=r"regions not in the model: \['chr1:1-2'\]"):
        feature_indices("regions", ["chr1:1-2"], ("chr1:5-9",))
