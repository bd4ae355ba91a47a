"""The train stage checks its inputs before building a model: on a GPU node, with KFP
retrying every failure, a bad input must fail in seconds."""

import pytest

from trainer.config import Config
from trainer.data.prepare import prepare_dataset
from trainer.errors import UserError
from trainer.stages import train


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    prepare_dataset("shapes", out, count=4, image_size=64, val_fraction=0.5, shards=1,
                    workers=1, progress=False)
    return out


@pytest.mark.parametrize("change, message", [
    ({"config": {"NUM_CLASSES": 7}}, "NUM_CLASSES=7 but"),
    ({"layers": "mrcnn_("}, "neither one of heads"),
    ({"init": "last"}, "train first"),
    ({"init": "weights.h5"}, "no such weights file"),
    ({"init": "not_h5"}, "is not an HDF5 file"),
    ({"keep_last": 0}, "keep_last must be at least 1"),
])
def test_bad_inputs_fail_before_the_model_is_built(tiny_shapes, tmp_path, monkeypatch, change,
                                                   message):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the inputs were checked")

    monkeypatch.setattr(train, "MaskRCNN", no_model)
    (tmp_path / "not_h5").write_text("text")
    change = dict(change)
    config = Config.from_yaml("configs/demo.yaml").replace(**change.pop("config", {}))
    init = change.pop("init", "none")
    init = init if init in ("none", "last") else str(tmp_path / init)
    with pytest.raises(UserError, match=message):
        train.run_training(config, tiny_shapes, val_data=tiny_shapes, epochs=1,
                           model_dir=tmp_path / "runs", init=init, **change)
