"""The image-classification task: IDX and folder data, preprocessing shared with the device, a tiny CNN built end to end."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import yaml
from PIL import Image
from rich.progress import Progress
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.config import BuildConfig, DataSection, IdxFiles, ImageSection
from edgekit.data import DataError
from edgekit.errors import EdgekitError
from edgekit.tasks import image_classification, image_data, model_feeds
from tests.support.images import build_tiny_cnn, make_image_folder, pattern

ROOT = Path(__file__).resolve().parents[2]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
runner = CliRunner()
GRAY = ImageSection(size=(12, 12), channel_order="L")


# ---------------------------------------------------------------- fixtures


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


# ---------------------------------------------------------------- IDX


def test_idx_reader_reads_gzip_and_plain_files(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain.idx").write_bytes(_idx_bytes(images))
    (tmp_path / "packed.idx.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    for name in ("plain.idx", "packed.idx.gz"):
        np.testing.assert_array_equal(image_data.read_idx(tmp_path / name), images)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"PK\x03\x04" + b"\0" * 20, "is not an IDX file"),
        (bytes([0, 0, 0x08, 3]) + (2).to_bytes(4, "big"), "truncated inside its header"),
        (_idx_bytes(np.zeros((4, 3, 3)))[:-5], "truncated or damaged"),
        (gzip.compress(_idx_bytes(np.zeros((4, 3, 3))))[:-12], "damaged gzip file"),
        (b"", "is not an IDX file"),
    ],
    ids=["bad-magic", "short-header", "truncated-data", "truncated-gzip", "empty"],
)
def test_idx_reader_names_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "broken.idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        image_data.read_idx(path)


def _idx_set(folder: Path, train_labels, test_labels, size: int = 12) -> IdxFiles:
    rng = np.random.default_rng(0)
    files = {}
    for split, labels in (("train", train_labels), ("test", test_labels)):
        labels = np.asarray(labels, np.uint8)
        images = rng.integers(0, 256, size=(len(labels), size, size), dtype=np.uint8)
        files[f"{split}_images"] = folder / f"{split}-images.gz"
        files[f"{split}_labels"] = folder / f"{split}-labels.gz"
        files[f"{split}_images"].write_bytes(gzip.compress(_idx_bytes(images)))
        files[f"{split}_labels"].write_bytes(gzip.compress(bytes([0, 0, 0x08, 1]) + len(labels).to_bytes(4, "big") + labels.tobytes()))
    return IdxFiles(**files)


def test_idx_data_carves_a_stratified_val_split_and_keeps_named_label_order(tmp_path):
    files = _idx_set(tmp_path, [0, 1, 2] * 20, [0, 1, 2] * 5)
    data = image_classification.load_task_data(DataSection(idx=files, label_names=["zero", "one", "two"]), GRAY)
    assert data.labels == ("zero", "one", "two")
    assert (len(data.train), len(data.val), len(data.test)) == (54, 6, 15)
    assert data.train.inputs.dtype == np.uint8 and data.train.inputs.shape[1:] == (12, 12, 1)
    assert sorted(np.bincount(data.val.labels).tolist()) == [2, 2, 2]
    assert data.train.labels[:3].tolist() == [0, 1, 2], "splits are interleaved by class, so any prefix is stratified"


@pytest.mark.parametrize(
    ("train", "test", "names", "message"),
    [
        ([0] * 30, [0] * 5, None, "classification needs at least 2"),
        ([0, 1] * 15, [0, 1, 2] * 3, None, r"test has class\(es\) \['2'\] that train does not"),
        ([0, 1, 2] * 10, [0, 1] * 3, ["a", "b"], "labels go up to 2 but data.label_names has 2 names"),
    ],
    ids=["one-class", "label-only-in-test", "too-few-names"],
)
def test_idx_data_errors(tmp_path, train, test, names, message):
    with pytest.raises(DataError, match=message):
        image_classification.load_task_data(DataSection(idx=_idx_set(tmp_path, train, test), label_names=names), GRAY)


def test_grayscale_idx_with_an_rgb_model_says_which_channel_order(tmp_path):
    files = _idx_set(tmp_path, [0, 1] * 15, [0, 1] * 3)
    with pytest.raises(DataError, match="set channel_order: L"):
        image_classification.load_task_data(DataSection(idx=files), ImageSection(size=(12, 12)))


# ---------------------------------------------------------------- folders


def test_image_folder_counts_and_skips_corrupt_images_and_other_files(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=10)
    (root / "dot" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "dot" / "half.jpg").write_bytes((root / "dot" / "0.png").read_bytes()[:40])
    (root / "vertical" / "notes.txt").write_text("not an image")
    shutil.copy(root / "horizontal" / "0.png", root / "horizontal" / "copy-of-0.png")
    data = image_classification.load_task_data(DataSection(path=root), GRAY)
    assert data.summary["dropped"] == {"duplicates": 1, "not_images": 1, "unreadable": 2}
    assert data.summary["rows_kept"] == 30 and data.summary["rows_read"] == 34
    assert any("skipped 2 unreadable image(s)" in warning for warning in data.summary["warnings"])
    assert len(data.train) + len(data.val) + len(data.test) == 30


def test_image_folder_with_split_subfolders_and_a_stranger_class_in_test(tmp_path):
    make_image_folder(tmp_path / "ok" / "train", per_class=10)
    make_image_folder(tmp_path / "ok" / "test", per_class=3, seed=1)
    data = image_classification.load_task_data(DataSection(path=tmp_path / "ok"), GRAY)
    assert len(data.test) == 9 and len(data.val) > 0, "val is carved from train when the folder has none"
    make_image_folder(tmp_path / "bad" / "train", per_class=10, classes=("dot", "vertical"))
    make_image_folder(tmp_path / "bad" / "test", per_class=3, classes=("dot", "horizontal"), seed=1)
    with pytest.raises(DataError, match=r"test has class\(es\) \['horizontal'\] that train does not"):
        image_classification.load_task_data(DataSection(path=tmp_path / "bad"), GRAY)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    (tmp_path / "empty" / "cats" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no readable images; expected .*/<class>/<image>.png"):
        image_classification.load_task_data(DataSection(path=tmp_path / "empty"), GRAY)
    (tmp_path / "corrupt" / "cats").mkdir(parents=True)
    (tmp_path / "corrupt" / "cats" / "a.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="1 could not be decoded"):
        image_classification.load_task_data(DataSection(path=tmp_path / "corrupt"), GRAY)
    make_image_folder(tmp_path / "one", per_class=5, classes=("dot",))
    with pytest.raises(DataError, match=r"train has 1 class\(es\) \['dot'\]; classification needs at least 2"):
        image_classification.load_task_data(DataSection(path=tmp_path / "one"), GRAY)
    with pytest.raises(DataError, match="does not exist"):
        image_classification.load_task_data(DataSection(path=tmp_path / "missing"), GRAY)


def test_folder_images_of_other_sizes_are_brought_to_the_model_square(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=5)
    Image.fromarray(np.full((30, 20, 3), 200, np.uint8)).save(root / "dot" / "big-colour.png")
    data = image_classification.load_task_data(DataSection(path=root), GRAY)
    assert data.train.inputs.shape[1:] == (12, 12, 1)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"task": {"kind": "image-classification"}}, "is a text model; image-classification takes builtin:small-cnn"),
        ({"task": {"kind": "image-classification"}, "model": {"source": "builtin:small-cnn"}, "finetune": {"enabled": True}},
         "set finetune.method: full"),
        ({"model": {"source": "builtin:small-cnn"}}, "set task.kind: image-classification"),
        ({"task": {"kind": "image-classification", "image": {"channel_order": "L", "mean": [0.5, 0.5, 0.5]}},
          "model": {"source": "builtin:small-cnn"}}, "mean has 3 values; channel_order L has 1"),
        ({"task": {"kind": "image-classification", "image": {"size": [32, 32], "resize": 28}}, "model": {"source": "builtin:small-cnn"}},
         "resize 28 is smaller than the crop"),
        ({"task": {"kind": "image-classification", "image": {"colour": "RGB"}}, "model": {"source": "builtin:small-cnn"}}, "colour"),
    ],
    ids=["text-model", "lora", "image-model-for-text", "mean-channels", "resize-below-crop", "unknown-key"],
)
def test_image_config_errors(tmp_path, document, message):
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(document))
    result = runner.invoke(app, ["build", str(path), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output


def test_example_fashion_mnist_config_is_valid():
    from edgekit.config import load_build_config

    config = load_build_config(ROOT / "examples" / "fashion-mnist.yaml")
    assert config.task.kind == "image-classification" and config.data.idx is not None
    assert set(config.targets) == {"x86-64-cpu", "jetson-orin-nano-8gb"}
    assert len(config.data.label_names) == 10


# ---------------------------------------------------------------- preprocessing and memory


def test_build_and_device_preprocess_alike():
    """model_feeds (every pass) and the device's ImagePreprocessor read from the signed manifest give identical tensors."""
    from device_agent.bundle import ImagePreprocessing
    from device_agent.preprocess import ImagePreprocessor

    section = ImageSection(size=(10, 10), resize=12, channel_order="BGR", mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4])
    task = image_classification.task_spec(("a", "b"), section)
    images = np.random.default_rng(1).integers(0, 256, size=(3, 17, 13, 3), dtype=np.uint8)
    built = model_feeds(task, images)["pixel_values"]
    on_device = ImagePreprocessor(ImagePreprocessing.model_validate_json(task.image.model_dump_json()))(images)
    np.testing.assert_array_equal(built, on_device)
    assert built.shape == (3, 3, 10, 10)
    manual = (images.astype(np.float32)[:, :, :, ::-1] / 255 - [0.6, 0.5, 0.4]) / [0.4, 0.3, 0.2]
    assert not np.allclose(built[:, :, 0, 0], manual[:, 0, 0]), "resized and cropped, not just normalised"


def test_a_batch_too_large_for_memory_is_refused_before_training(tmp_path):
    from edgekit.artifact import PassContext
    from edgekit.tasks import image_models

    data = image_classification.load_task_data(DataSection(path=make_image_folder(tmp_path / "images", per_class=5)), GRAY)
    task = image_classification.task_spec(data.labels, GRAY)
    model = image_models.small_cnn(1, 3, [8, 16])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = image_classification.LoopSettings(epochs=1, batch_size=10**9, learning_rate=1e-3, weight_decay=0, warmup_ratio=0,
                                                 patience=1, seed=0)
    ctx = PassContext(tmp_path, data, Progress(disable=True), tmp_path / "k", print)
    with pytest.raises(EdgekitError, match=r"train.batch_size 1000000000 with 1x12x12 images needs about .* GiB .* set train.batch_size to \d+ or less"):
        image_classification.train_model(model, data, task, settings, ctx, "train", keep_initial=False)
    assert all((model.state_dict()[k] == v).all() for k, v in before.items()), "nothing was trained"


# ---------------------------------------------------------------- the build, end to end


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    return build_tiny_cnn(tmp_path_factory.mktemp("image-build"), ("x86-64-cpu", "jetson-orin-nano-8gb"),
                           finetune={"enabled": True, "method": "full", "epochs": 1, "batch_size": 16, "learning_rate": 0.001})


def test_tiny_image_build_trains_exports_faithfully_and_quantizes_static_qdq(tiny_build):
    report = json.loads((tiny_build / "out" / "x86-64-cpu-test" / "report.json").read_text())
    assert report["passed"], report["gates"]
    assert [p["name"] for p in report["passes"]] == ["load", "finetune", "export", "optimize", "quantize", "compile", "evaluate", "package"]
    assert report["metrics"]["load"]["val_accuracy"] > 0.6, "the CNN learned the three patterns"
    assert report["metrics"]["export"]["parity_max_abs_error"] < 1e-4
    assert report["metrics"]["finetune"]["method"] == "full"
    quantization = report["quantization"]
    # x86-64-cpu asks for dynamic int8, which has no int8 convolutions: the pass turns a graph with Conv to static QDQ.
    assert (quantization["scheme"], quantization["requested_scheme"]) == ("static_qdq", "dynamic") and "Conv" in quantization["note"]
    assert quantization["per_channel"] and quantization["activation_type"] == "uint8" and quantization["calibration_rows"] > 0
    assert report["precision"] == "int8"
    graph = onnx.load(str(tiny_build / "out" / "x86-64-cpu-test" / "passes" / "05-quantize" / "model.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= {node.op_type for node in graph.node}
    weights = {init.name: init for init in graph.initializer}
    conv_scales = [onnx.numpy_helper.to_array(weights[n.input[1]]) for n in graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in weights and len(weights[n.input[0]].dims) == 4]
    assert conv_scales and all(scale.size > 1 for scale in conv_scales), "conv weights are quantized per channel"


def test_tiny_image_bundles_verify_and_carry_the_preprocessing(tiny_build):
    from device_agent.bundle import ImagePreprocessing, open_bundle
    from device_agent.keys import Keyring

    for target in ("x86-64-cpu-test", "jetson-orin-nano-8gb-test"):
        bundle = tiny_build / "out" / target / "tiny-cnn-1.0.0.ekb"
        result = runner.invoke(app, ["bundle", "verify", str(bundle), "--keyring", str(tiny_build / "keyring")])
        assert result.exit_code == 0, result.output
        with open_bundle(bundle, Keyring.load(tiny_build / "keyring")) as opened:
            manifest = opened.manifest
            assert manifest.task.kind == "image-classification" and manifest.task.labels == ["dot", "horizontal", "vertical"]
            assert manifest.preprocessing == ImagePreprocessing(resize=12, crop=(12, 12), channel_order="L", mean=[0.5], std=[0.25])
            assert [(i.name, i.shape) for i in manifest.inputs] == [("pixel_values", ["batch", 1, 12, 12])]
            assert "tokenizer.json" not in {entry.path for entry in manifest.files}
    with open_bundle(tiny_build / "out" / "jetson-orin-nano-8gb-test" / "tiny-cnn-1.0.0.ekb", Keyring.load(tiny_build / "keyring")) as opened:
        engine_build = opened.manifest.runtime.engine_build
        assert opened.manifest.precision == "int8" and engine_build["precision"] == "int8"
        assert engine_build["profile"]["pixel_values"]["max"] == [8, 1, 12, 12]


def test_a_real_agent_serves_the_built_image_bundle(tiny_build, tmp_path):
    import tritonclient.http as triton

    from device_agent.config import AgentSettings
    from device_agent.keys import Keyring
    from device_agent.repository import Repository
    from device_agent.server import create_app
    from tests.support.agent import serving, wait_ready

    settings = AgentSettings(state_dir=tmp_path / "state", keyring_dir=tiny_build / "keyring")
    repository = Repository(settings.state_dir, Keyring.load(tiny_build / "keyring"))
    repository.start()
    repository.install(tiny_build / "out" / "x86-64-cpu-test" / "tiny-cnn-1.0.0.ekb")
    rng = np.random.default_rng(7)
    labels = ["dot", "horizontal", "vertical"]
    images = np.stack([pattern(labels[i % 3], rng) for i in range(6)])[..., None]
    model_path = tiny_build / "out" / "x86-64-cpu-test" / "passes" / "05-quantize" / "model.onnx"
    task = image_classification.task_spec(tuple(labels), GRAY)
    expected = onnxruntime.InferenceSession(str(model_path)).run(None, model_feeds(task, images))[0]
    with serving(create_app(repository, settings)) as address:
        wait_ready(f"http://{address}")
        client = triton.InferenceServerClient(address)
        tensor = triton.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        got = client.infer("tiny-cnn", [tensor]).as_numpy("logits")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.mean(got.argmax(-1) == np.arange(6) % 3) >= 0.5, "the served model tells the patterns apart"


def test_hugging_face_resnet_from_a_config_trains_and_exports(tmp_path):
    from edgekit.artifact import Artifact, PassContext, Stage
    from edgekit.passes import export, load

    data = image_classification.load_task_data(DataSection(path=make_image_folder(tmp_path / "images", per_class=10)), GRAY)
    config = BuildConfig.model_validate({
        "model": {"source": "config:resnet", "widths": [8, 16]},
        "task": {"kind": "image-classification", "image": {"size": [12, 12], "channel_order": "L"}},
        "train": {"epochs": 1, "batch_size": 16},
    })
    source = Artifact(Stage.SOURCE, Path("config:resnet"), "", load.source_digest("config:resnet"), image_classification.task_spec(data.labels, GRAY))
    (tmp_path / "load").mkdir()
    ctx = PassContext(tmp_path / "load", data, Progress(disable=True), tmp_path / "k", print)
    loaded = load.run(source, load.options_for(config, None), ctx)
    assert (loaded.directory / "hf" / "config.json").is_file()
    assert json.loads((loaded.directory / "hf" / "config.json").read_text())["model_type"] == "resnet"
    (tmp_path / "export").mkdir()
    ctx = PassContext(tmp_path / "export", data, Progress(disable=True), tmp_path / "k", print)
    exported = export.run(loaded, export.options_for(config, None), ctx)
    assert exported.results.export.model_dump()["parity_max_abs_error"] < 1e-4
    assert [i.name for i in onnx.load(str(exported.model_path)).graph.input] == ["pixel_values"]


needs_fashion_mnist = pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason=(
    "Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)"))


@pytest.fixture(scope="module")
def fashion_build(tmp_path_factory) -> Path:
    """The Fashion-MNIST example built as shipped (both targets); the folder holds out/ and cache/."""
    root = tmp_path_factory.mktemp("fashion-mnist")
    config = ROOT / "examples" / "fashion-mnist.yaml"
    result = runner.invoke(app, ["build", str(config), "--out", str(root / "out"), "--cache-dir", str(root / "cache")])
    assert result.exit_code == 0, result.output
    return root


@pytest.mark.slow
@needs_fashion_mnist
def test_fashion_mnist_example_meets_its_accuracy_bars(fashion_build):
    for target in ("x86-64-cpu", "jetson-orin-nano-8gb"):
        report = json.loads((fashion_build / "out" / target / "report.json").read_text())
        assert report["passed"] and report["precision"] == "int8"
        assert report["metrics"]["reference"]["accuracy"] >= 0.90
        assert report["metrics"]["reference"]["accuracy"] - report["metrics"]["final"]["accuracy"] <= 0.005


@pytest.mark.slow
@needs_fashion_mnist
def test_explain_draws_a_fashion_mnist_heat_map_on_the_garment(fashion_build, tmp_path):
    """The int8 bundle explains a test trouser: the heat map PNG is red where its legs part, not far out in the
    background."""
    from edgekit.tasks.image_data import read_idx

    images = read_idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    trouser = images[int(np.flatnonzero(labels == 1)[0])]
    Image.fromarray(trouser).save(tmp_path / "trouser.png")
    keyring = tmp_path / "keyring"
    keyring.mkdir()
    shutil.copy(fashion_build / "cache" / "dev-key" / "edgekit.pub", keyring / "dev.pub")
    heat_png = tmp_path / "trouser.heat.png"
    result = runner.invoke(app, ["explain", str(fashion_build / "out" / "x86-64-cpu" / "fashion-mnist-cnn-1.0.0.ekb"),
                                 "--image", str(tmp_path / "trouser.png"), "--out", str(heat_png), "--keyring", str(keyring), "--json"])
    assert result.exit_code == 0, result.output
    explained = json.loads(result.stdout)
    assert explained["label"] == "Trouser" and explained["probability"] > 0.9, explained
    assert explained["rows_run"] == 1 + 13 * 13, "a 4-pixel patch at stride 2 over 28x28, plus the image itself"
    drawn = np.asarray(Image.open(heat_png))
    assert drawn.shape[:2] == (28 * 8, 28 * 8) and drawn.shape[2] == 3, "enlarged 8x, RGB"
    redness = (drawn[..., 0].astype(float) - drawn[..., 2].astype(float)).reshape(28, 8, 28, 8).mean(axis=(1, 3))
    # What tells a trouser from a dress is the gap between its legs: background pixels with garment on both sides in
    # their row. Painted over, the gap closes; the heat there is far above that of the background beyond the garment.
    garment = trouser > 30
    columns = np.arange(28)
    left = np.array([columns[row].min() if row.any() else 28 for row in garment])[:, None]
    right = np.array([columns[row].max() if row.any() else -1 for row in garment])[:, None]
    gap = ~garment & (columns[None, :] > left) & (columns[None, :] < right)
    beyond = ~garment & ((columns[None, :] < left - 4) | (columns[None, :] > right + 4))
    assert gap.sum() >= 10 and beyond.sum() >= 100
    assert redness[gap].mean() > 1.5 * redness[beyond].mean() + 10, (redness[gap].mean(), redness[beyond].mean())


def test_a_pruned_image_build_removes_conv_channels_and_still_bundles(tmp_path):
    from device_agent.bundle import open_bundle
    from device_agent.keys import Keyring

    build_tiny_cnn(tmp_path, ("x86-64-cpu",), prune={"enabled": True, "ratio": 0.5, "recovery_steps": 20, "recovery_batch_size": 16})
    report = json.loads((tmp_path / "out" / "x86-64-cpu-test" / "report.json").read_text())
    assert [p["name"] for p in report["passes"]][:3] == ["load", "prune", "export"]
    pruned = report["metrics"]["prune"]
    assert (pruned["channels_before"], pruned["channels_after"]) == ([8, 16], [4, 8])
    assert pruned["parameters"]["after"] < pruned["parameters"]["before"] / 2
    assert report["metrics"]["export"]["parity_max_abs_error"] < 1e-4, "the rebuilt narrower CNN exports faithfully"
    with open_bundle(tmp_path / "out" / "x86-64-cpu-test" / "tiny-cnn-1.0.0.ekb", Keyring.load(tmp_path / "keyring")) as opened:
        graph = onnx.load(str(opened.path("model.onnx"))).graph
        weights = {init.name: init for init in graph.initializer}
        first_conv = next(node for node in graph.node if node.op_type == "Conv")
        # The conv's weight may sit behind a DequantizeLinear in the int8 model.
        source = next((n.input[0] for n in graph.node if n.output[0] == first_conv.input[1]), first_conv.input[1])
        assert weights[source].dims[0] == 4, "four of the eight first-stage channels are gone"


def test_explain_draws_a_heat_map_on_the_lines_a_horizontal_pattern_is_recognised_by(tiny_build, tmp_path):
    rng = np.random.default_rng(3)
    image = pattern("horizontal", rng)
    lines = [row for row in range(12) if (image[row] == 255).all()]
    Image.fromarray(image).save(tmp_path / "lines.png")
    bundle = tiny_build / "out" / "x86-64-cpu-test" / "tiny-cnn-1.0.0.ekb"
    heat_png = tmp_path / "heat.png"
    result = runner.invoke(app, ["explain", str(bundle), "--image", str(tmp_path / "lines.png"), "--out", str(heat_png),
                                 "--keyring", str(tiny_build / "keyring"), "--json"])
    assert result.exit_code == 0, result.output
    explained = json.loads(result.stdout)
    assert explained["label"] == "horizontal" and explained["method"] == "occlusion"
    assert explained["rows_run"] == 1 + 11 * 11, "a 2-pixel patch at stride 1 over 12x12, plus the image itself"
    assert explained["heatmap_png"] == str(heat_png)
    # Look at the picture: red (support) on the pattern's lines, far less elsewhere.
    drawn = np.asarray(Image.open(heat_png))
    assert drawn.ndim == 3 and drawn.shape[2] == 3 and drawn.shape[0] >= 224 and drawn.shape[0] % 12 == 0
    scale = drawn.shape[0] // 12
    redness = (drawn[..., 0].astype(float) - drawn[..., 2].astype(float)).reshape(12, scale, 12, scale).mean(axis=(1, 3))
    others = [row for row in range(12) if row not in lines]
    assert redness[lines].mean() > redness[others].mean() + 20, (lines, redness.mean(axis=1).round(1))
    patch, regions = explained["heatmap"]["patch"], explained["heatmap"]["top_regions"]
    # A patch over a line's neighbour row also covers the line, so the heat spreads one row around each line.
    near_lines = [any(r["row"] - 1 <= line <= r["row"] + patch for line in lines) for r in regions[:3]]
    assert all(near_lines), (regions, lines)


def test_explain_brings_an_image_to_the_model_and_refuses_what_it_cannot_read(tiny_build, tmp_path):
    bundle = tiny_build / "out" / "x86-64-cpu-test" / "tiny-cnn-1.0.0.ekb"
    keyring = ["--keyring", str(tiny_build / "keyring")]
    big_colour = np.repeat(np.kron(pattern("vertical", np.random.default_rng(1)), np.ones((2, 2), np.uint8))[..., None], 3, axis=2)
    Image.fromarray(big_colour).save(tmp_path / "big.png")
    result = runner.invoke(app, ["explain", str(bundle), "--image", str(tmp_path / "big.png"), "--out", str(tmp_path / "h.png"),
                                 "--json", *keyring])
    assert result.exit_code == 0, result.output
    assert "converted from RGB to L" in result.stderr, "the note goes to stderr, so stdout stays JSON"
    explained = json.loads(result.stdout)
    assert explained["heatmap"]["shape"] == [12, 12], "the bundle's own resize brought 24x24 to its 12x12"
    assert explained["label"] == "vertical"
    (tmp_path / "not-an-image.png").write_text("hello")
    result = runner.invoke(app, ["explain", str(bundle), "--image", str(tmp_path / "not-an-image.png"), *keyring])
    assert result.exit_code == 2 and "is not an image Pillow can read" in result.output
    result = runner.invoke(app, ["explain", str(bundle), "--text", "a text for an image model", *keyring])
    assert result.exit_code == 2 and "takes image input, not text" in result.output
