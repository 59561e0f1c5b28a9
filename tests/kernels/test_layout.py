import pytest
from jaxrec_kernels.layout import (
    FeatureLayout,
    check_columns,
    checks_ids,
    counts_bad_ids,
    feature_layouts,
)


def test_feature_layout_is_the_plain_tuple_for_hashing_and_equality():
    feat = FeatureLayout(kjt_index=2, row_offset=10, num_rows=5, col_offset=7)
    assert feat == (2, 10, 5, 7)
    assert hash(feat) == hash((2, 10, 5, 7))
    assert (feat.kjt_index, feat.row_offset, feat.num_rows, feat.col_offset) == (2, 10, 5, 7)


def test_feature_layouts_names_plain_tuples():
    layouts = feature_layouts(((0, 0, 3, 0), (1, 3, 2, 4)))
    assert all(isinstance(f, FeatureLayout) for f in layouts)
    assert [f.col_offset for f in layouts] == [0, 4]


@pytest.mark.parametrize("features", [(), ((0, 0, 3),), ((0, 0, 3, 1.5),), [(0, 0, 3, 0)]])
def test_feature_layouts_refuses_malformed_features(features):
    with pytest.raises(ValueError, match="feature"):
        feature_layouts(features)


def test_check_columns_names_the_feature_past_the_width():
    check_columns(((0, 0, 3, 4),), 4, 8, "num_columns=8")
    with pytest.raises(ValueError, match=r"columns \[5, 9\) exceed num_columns=8"):
        check_columns(((0, 0, 3, 5),), 4, 8, "num_columns=8")


@pytest.mark.parametrize(
    ("mode", "checked", "counted"),
    [
        ("fatal", True, True),
        ("warning", True, True),
        ("ignore", True, False),
        ("none", False, False),
    ],
)
def test_bounds_modes(mode, checked, counted):
    assert checks_ids(mode) is checked
    assert counts_bad_ids(mode) is counted
