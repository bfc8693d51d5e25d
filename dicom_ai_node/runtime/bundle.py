"""MONAI bundles in the Model Zoo layout, run from a local folder with their own transforms and inferer.

    <bundle>/configs/metadata.json   network_data_format: input/output keys, channel_def (labels), spatial dims
    <bundle>/configs/inference.json  network_def, preprocessing, inferer, postprocessing (.yaml also read)
    <bundle>/models/model.pt         state dict (or {"model": state dict}); or models/model.ts (TorchScript)

MONAI's ConfigParser instantiates `network_def`, `preprocessing`, `inferer` and `postprocessing` exactly as
the bundle defines them; the node only sets `bundle_root` and `device`, never downloads, and drops
SaveImage(d) from the postprocessing (results go to DICOM, not to files in the bundle folder). Parts the node
does not use (datalist, dataloader, evaluator, handlers) are never parsed, so their paths need not exist.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.runtime.infer import CompiledNetwork, prepare_network, run_inferer
from dicom_ai_node.runtime.nifti import to_volume_order, write_nifti

log = logging.getLogger("dicom_ai_node.runtime")


class BundleError(ValueError):
    """A bundle folder that cannot be used; the message names the file and key at fault."""


@dataclass(frozen=True)
class BundleMetadata:
    input_key: str
    output_key: str
    spatial_dims: int
    channels: dict[int, str]  # output channel (label value) -> name, background included
    name: str
    version: str


def read_metadata(folder: Path) -> BundleMetadata:
    path = folder / "configs" / "metadata.json"
    try:
        meta = json.loads(path.read_text())
        fmt = meta["network_data_format"]
        (input_key, inputs), = fmt["inputs"].items()
        (output_key, outputs), = fmt["outputs"].items()
        spatial_dims = len(inputs["spatial_shape"])
        channels = {int(k): str(v) for k, v in outputs.get("channel_def", {}).items()}
    except OSError as exc:
        raise BundleError(f"{path}: cannot read bundle metadata: {exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path}: network_data_format needs one input and one output with spatial_shape "
                          f"(and channel_def for labels): {type(exc).__name__}: {exc}") from exc
    return BundleMetadata(input_key, output_key, spatial_dims, channels, str(meta.get("name", folder.name)),
                          str(meta.get("version", "")))


def config_file(folder: Path) -> Path:
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        if (folder / "configs" / name).is_file():
            return folder / "configs" / name
    raise BundleError(f"{folder / 'configs'}: no inference.json or inference.yaml")


def _without_savers(transform: Any) -> Any:
    from monai.transforms import Compose, SaveImage, SaveImaged

    if isinstance(transform, Compose):
        kept = [t for t in transform.transforms if not isinstance(t, (SaveImage, SaveImaged))]
        return Compose(kept)
    return transform


def load_weights(network, folder: Path, device: str):
    """models/model.pt (a state dict, possibly under "model") into the bundle's network_def, or models/model.ts."""
    import torch

    pt, ts = folder / "models" / "model.pt", folder / "models" / "model.ts"
    if pt.is_file():
        state = torch.load(pt, map_location=device, weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        try:
            network.load_state_dict(state)
        except RuntimeError as exc:
            raise BundleError(f"{pt}: weights do not fit network_def: {str(exc).splitlines()[0]}") from exc
        return network.to(device)
    if ts.is_file():
        return torch.jit.load(str(ts), map_location=device)
    raise BundleError(f"{folder / 'models'}: no model.pt or model.ts")


class MonaiBundle:
    """A bundle loaded once onto a device (warm), run on one Volume at a time."""

    def __init__(self, folder: Path, device: str = "cpu", amp: bool = True, compile: bool = False,
                 cpu_amp: bool = False) -> None:
        from monai.bundle import ConfigParser

        self.folder = Path(folder).resolve()
        self.device = device
        self.amp = amp
        self.cpu_amp = cpu_amp
        self.meta = read_metadata(self.folder)
        path = config_file(self.folder)
        parser = ConfigParser()
        parser.read_meta(str(self.folder / "configs" / "metadata.json"))
        parser.read_config(str(path))
        parser["bundle_root"] = str(self.folder)
        parser["device"] = f"$torch.device({device!r})"
        self.parser = parser
        try:
            network = parser.get_parsed_content("network_def")
            self.preprocessing = parser.get_parsed_content("preprocessing")
            self.inferer = parser.get_parsed_content("inferer")
            self.postprocessing = _without_savers(parser.get_parsed_content("postprocessing"))
        except KeyError as exc:
            raise BundleError(f"{path}: missing {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - any config error must name the bundle file
            raise BundleError(f"{path}: {type(exc).__name__}: {exc}") from exc
        # `module` is the network itself (Grad-CAM hooks its layers); `network` is what the inferer calls:
        # the same module, or its torch.compile'd form.
        self.module = prepare_network(load_weights(network, self.folder, device), device, self.meta.spatial_dims)
        self.network = CompiledNetwork(self.module) if compile else self.module

    def preprocess(self, volume: Volume, work_dir: Path) -> dict[str, Any]:
        path = write_nifti(volume, work_dir / f"{self.meta.input_key}.nii", self.meta.spatial_dims)
        return self.preprocessing({self.meta.input_key: str(path)})

    def infer(self, data: dict[str, Any]):
        """The bundle's inferer on the preprocessed input, batch of one, AMP on GPU; the batch's item."""
        batch = data[self.meta.input_key].unsqueeze(0).to(self.device)
        return run_inferer(self.inferer, self.network, batch, self.device, self.amp, self.cpu_amp)[0]

    def to_original(self, data: dict[str, Any], key: str, tensor) -> np.ndarray:
        """A map in network input space (e.g. a Grad-CAM) -> the Volume's order, by inverting the bundle's
        preprocessing the way its postprocessing inverts predictions."""
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        image = data[self.meta.input_key]
        data = {**data, key: MetaTensor(tensor.cpu(), meta=dict(image.meta))}
        inverted = Invertd(keys=key, transform=self.preprocessing, orig_keys=self.meta.input_key,
                           nearest_interp=False, to_tensor=True)(data)
        return to_volume_order(np.asarray(inverted[key].detach().cpu()), self.meta.spatial_dims)

    def run(self, volume: Volume, work_dir: Path | None = None) -> "BundleOutput":
        """Preprocess, infer, postprocess: the output in the Volume's order, and seconds per stage."""
        with tempfile.TemporaryDirectory(dir=work_dir, prefix="bundle-") as tmp:
            t0 = time.perf_counter()
            data = self.preprocess(volume, Path(tmp))
            t1 = time.perf_counter()
            data[self.meta.output_key] = self.infer(data).cpu()
            t2 = time.perf_counter()
            data = self.postprocessing(data)
            output = np.asarray(data[self.meta.output_key].detach().cpu())
            t3 = time.perf_counter()
        if output.ndim == self.meta.spatial_dims:  # postprocessing squeezed the channel
            output = output[None]
        return BundleOutput(to_volume_order(output, self.meta.spatial_dims),
                            {"preprocess": t1 - t0, "inference": t2 - t1, "postprocess": t3 - t2})


@dataclass
class BundleOutput:
    array: np.ndarray  # (channels, slices, rows, columns) in the Volume's geometry
    seconds: dict[str, float]

    def labels(self) -> np.ndarray:
        """A label map (slices, rows, columns): argmax of several channels, or the one channel as labels."""
        if self.array.shape[0] > 1:
            return np.argmax(self.array, axis=0).astype(np.int16)
        return np.rint(self.array[0]).astype(np.int16)
