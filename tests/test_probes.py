"""Linear probes of memory features: pooled over a segment vs one position (mfcore.companion.probes)."""
import torch
import torch.nn.functional as F

from mfcore.companion.probes import linear_probe, segment_features


class _MeanColourModel:
    """Stands in for a model: its memory is the image averaged over 8x8 blocks ([B, 3, 8, 8] for 64x64)."""

    def pixel_features(self, images):
        return None, F.avg_pool2d(images, 8)


def _two_halves(left: float, right: float) -> dict:
    image = torch.full((3, 64, 64), right)
    image[:, :, :32] = left
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, :, :32], masks[1, :, 32:] = True, True
    return {"image": image, "masks": masks, "labels": torch.tensor([3, 5])}


def test_pooled_features_are_the_memory_mean_over_the_segment_and_local_ones_its_positions():
    feats = segment_features(_MeanColourModel(), [_two_halves(10.0, 200.0), _two_halves(20.0, 30.0)])
    assert torch.allclose(feats["pooled"][:, 0], torch.tensor([10.0, 200.0, 20.0, 30.0]))
    assert feats["pooled_labels"].tolist() == [3, 5, 3, 5]
    assert len(feats["local"]) == 2 * 64                      # every 8x8 position lies inside one half
    assert (feats["local_labels"] == 3).sum() == 64
    assert torch.all(feats["local"][feats["local_labels"] == 3, 0] < 25)


def test_a_segment_straddling_positions_is_weighted_by_area():
    sample = _two_halves(0.0, 80.0)
    sample["masks"][0, :, :36] = True                         # the left segment takes half a column of blocks more
    sample["masks"][1, :, :36] = False
    sample["image"][:, :, 32:36] = 0.0                        # painted like its segment
    feats = segment_features(_MeanColourModel(), [sample])
    # the right segment's pooled memory mixes the shared blocks (mean 40) by the area it holds in them
    assert 40.0 < feats["pooled"][1, 0] < 80.0
    assert len(feats["local"]) == 64 - 8                      # the shared column is owned by neither half


def test_linear_probe_separates_separable_data_and_not_random_labels():
    torch.manual_seed(0)
    x = torch.randn(400, 8)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    assert linear_probe(x[:300], y[:300], x[300:], y[300:], 4) > 85.0
    noise = torch.randint(0, 4, (400,))
    assert linear_probe(x[:300], noise[:300], x[300:], noise[300:], 4) < 45.0
