"""Tests of samkit.train.metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from samkit.train.metrics import expected_calibration_error, group_accuracy, per_class_accuracy

LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
PREDS = torch.tensor([0, 1, 0, 1, 1, 2, 0, 2, 1])


def test_per_class_accuracy_from_predictions_and_logits():
    acc = per_class_accuracy(PREDS, LABELS, 4)
    assert acc.dtype == torch.float64 and acc.shape == (4,)
    assert acc[:3].tolist() == pytest.approx([2 / 3, 1.0, 0.5])
    assert math.isnan(acc[3])  # no test example of class 3
    logits = torch.full((9, 4), -1.0)
    logits[torch.arange(9), PREDS] = 2.0
    assert torch.equal(per_class_accuracy(logits, LABELS, 4)[:3], acc[:3])


def test_per_class_accuracy_errors():
    with pytest.raises(ValueError, match="9 predictions but 8 labels"):
        per_class_accuracy(PREDS, LABELS[:8], 3)
    with pytest.raises(ValueError, match=r"labels range from 0 to 2, outside \[0, 2\)"):
        per_class_accuracy(PREDS, LABELS, 2)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        per_class_accuracy(PREDS, LABELS, 0)
    with pytest.raises(ValueError, match=r"scores \(N, C\)"):
        per_class_accuracy(torch.zeros(9, 2, 2), LABELS, 3)


def test_group_accuracy_hand_computed():
    acc = torch.tensor([1.0, 0.5, 0.25, 0.0, 0.75])
    groups = ["many", "many", "medium", "few", "few"]
    result = group_accuracy(acc, groups)
    assert result == pytest.approx({"overall": 0.5, "many": 0.75, "medium": 0.25, "few": 0.375})
    mapping = {"many": [0, 1], "medium": [2], "few": [3, 4]}
    assert group_accuracy(acc.tolist(), mapping) == pytest.approx(result)


def test_group_accuracy_empty_group_and_missing_class():
    result = group_accuracy([0.2, 0.4, 0.9], ["many", "medium", "medium"])
    assert result["overall"] == pytest.approx(0.5)
    assert result["medium"] == pytest.approx(0.65)
    assert math.isnan(result["few"])
    # A class without test examples (NaN accuracy) is left out of the means.
    result = group_accuracy(torch.tensor([1.0, math.nan, 0.5]), ["many", "many", "few"])
    assert result["overall"] == pytest.approx(0.75) and result["many"] == 1.0
    assert result["few"] == 0.5 and math.isnan(result["medium"])


def test_group_accuracy_errors():
    with pytest.raises(ValueError, match="groups gives 2 entries for 3 classes"):
        group_accuracy([0.1, 0.2, 0.3], ["many", "few"])
    with pytest.raises(ValueError, match="class 1 has group 'tail'"):
        group_accuracy([0.1, 0.2], ["many", "tail"])
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        group_accuracy([0.1, 0.2], {"many": [0, 2]})


PROBS = torch.tensor(
    [
        [0.9, 0.05, 0.05],  # confidence 0.90, correct
        [0.92, 0.04, 0.04],  # confidence 0.92, wrong
        [0.2, 0.7, 0.1],  # confidence 0.70, correct
        [0.5, 0.3, 0.2],  # confidence 0.50, wrong
    ],
    dtype=torch.float64,
)
PROB_LABELS = torch.tensor([0, 1, 1, 2])


def test_ece_hand_computed():
    # 15 bins: 0.90 and 0.92 share (13/15, 14/15]: |0.5 - 0.91| * 2/4 = 0.205;
    # 0.70 in (10/15, 11/15]: |1 - 0.7| / 4 = 0.075; 0.50 in (7/15, 8/15]: |0 - 0.5| / 4 = 0.125.
    assert expected_calibration_error(PROBS, PROB_LABELS) == pytest.approx(0.405)
    # One bin: |mean accuracy 0.5 - mean confidence 0.755|.
    assert expected_calibration_error(PROBS, PROB_LABELS, bins=1) == pytest.approx(0.255)
    # Logits: the softmax gives the same probabilities back.
    logits = PROBS.log() + 3.0
    assert expected_calibration_error(logits, PROB_LABELS) == pytest.approx(0.405)
    assert expected_calibration_error(PROBS.float(), PROB_LABELS, from_logits=False) == (
        pytest.approx(0.405, abs=1e-6)
    )


def test_ece_bin_edges_and_perfect_calibration():
    # A confidence on an edge belongs to the lower bin: 0.6 in (0.4, 0.6], 0.61 in (0.6, 0.8].
    probs = torch.tensor([[0.6, 0.4], [0.61, 0.39]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    assert expected_calibration_error(probs, labels, bins=5) == pytest.approx(
        0.5 * 0.4 + 0.5 * 0.61
    )
    # Confidence 0.8 and 80 % accuracy: perfectly calibrated.
    probs = torch.tensor([[0.8, 0.2]] * 5, dtype=torch.float64)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 0, 1])) == pytest.approx(
        0.0, abs=1e-12
    )


def test_ece_errors():
    with pytest.raises(ValueError, match="bins must be an integer >= 1"):
        expected_calibration_error(PROBS, PROB_LABELS, bins=0)
    with pytest.raises(ValueError, match="4 rows but 3 labels"):
        expected_calibration_error(PROBS, PROB_LABELS[:3])
    with pytest.raises(ValueError, match=r"\(N, C\) probabilities or logits"):
        expected_calibration_error(PROBS[0], PROB_LABELS)
