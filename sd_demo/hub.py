"""Everything that talks to the Hugging Face Hub or its local cache (huggingface_hub only here).

A diffusers repo often holds several copies of each weight (pickle .bin, fp32 and fp16 safetensors, EMA and
non-EMA, a single-file checkpoint at the top). We list the repo first and download only the files one pipeline
needs, so a 2 GB fp16 load never pulls the 10 GB repo.
"""
from __future__ import annotations

import errno
import fnmatch
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client (its dependency): what a dropped download raises
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    get_token,
    scan_cache_dir,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    CacheNotFound,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

log = logging.getLogger(__name__)

SAFE_WEIGHTS = (".safetensors",)
PICKLE_WEIGHTS = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# Small files every component needs: configs, tokenizer vocabularies, the pipeline index.
# The model card (README.md) comes too: it may recommend generation settings (``recommended_guidance``).
CONFIG_PATTERNS = ("model_index.json", "*/*.json", "*/*.txt", "*/*.model", "README.md")
# Components whose weights we load; other folders (safety_checker, feature_extractor) are never fetched.
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[\w.\-]{1,96}$")  # org/name; the Hub allows 96 characters a part
REVISION = re.compile(r"^[\w.\-/]{1,100}$")  # a branch, tag or commit: no spaces, brackets or markup


def is_offline() -> bool:
    # Read at call time: tests and users may set HF_HUB_OFFLINE after huggingface_hub was imported.
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or hf_constants.HF_HUB_OFFLINE


def cache_dir() -> str:
    # Also read at call time, so a test or a Space can point at another cache without re-importing.
    return os.environ.get("HF_HUB_CACHE") or hf_constants.HF_HUB_CACHE


def first_line(exc: BaseException) -> str:
    """An exception's first line of text, else its class name: for one-line messages."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def hub_error(repo_id: str, revision: str | None, exc: Exception) -> ValueError:
    rev = f"@{revision}" if revision else ""
    if isinstance(exc, GatedRepoError):
        return ValueError(f"model '{repo_id}' is gated: accept its license on the Hub and log in (HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return ValueError(f"model '{repo_id}' has no revision '{revision}'")
    if isinstance(exc, RepositoryNotFoundError):
        return ValueError(f"unknown model '{repo_id}': no such repo on the Hub (check the id, or log in if private)")
    if isinstance(exc, LocalEntryNotFoundError) or is_offline():
        return ValueError(
            f"unknown model '{repo_id}{rev}': not in the local Hugging Face cache and the Hub is offline "
            "(download it once with network, or pass a local folder)"
        )
    first = first_line(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ValueError(f"the download of '{repo_id}{rev}' stopped: the disk is full ({cache_dir()}); free space "
                          "or delete models in the Models tab, then try again")
    if isinstance(exc, HfHubHTTPError):  # (an OSError too) the Hub answered, with an error
        status = exc.response.status_code if exc.response is not None else "an error"
        return ValueError(f"could not download '{repo_id}{rev}': the Hub answered {status} ({first})")
    if isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError)):  # dropped or timed out mid-file
        # (within one call huggingface_hub resumes a dropped file with Range; across calls it keeps whole files only)
        return ValueError(f"the download of '{repo_id}{rev}' was interrupted ({first}); try again: the files already "
                          "downloaded are kept")
    return ValueError(f"could not reach the Hub for '{repo_id}{rev}': {first}")


def repo_file_sizes(repo_id: str, revision: str | None = None) -> dict[str, int]:
    """{path: bytes} of a model repo's files: from the Hub, or from the cached snapshot when offline."""
    from huggingface_hub.hf_api import RepoFile

    try:
        if is_offline():
            root = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=cache_dir()))
            return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
        tree = HfApi().list_repo_tree(repo_id, revision=revision, recursive=True)
        return {f.path: f.size for f in tree if isinstance(f, RepoFile)}
    except Exception as exc:  # every hub failure becomes one actionable line
        raise hub_error(repo_id, revision, exc) from exc


@dataclass
class WeightPlan:
    files: list[str]  # repo paths to download
    variant: str | None  # diffusers/transformers variant to load ("fp16") or None
    pickle: bool  # weights come from pickle files (only with allow_pickle)


def card_metadata(folder: Path) -> dict:
    """The YAML front matter of a model folder's README.md (the Hub's model card); {} when there is none usable."""
    from huggingface_hub import metadata_load

    card = Path(folder) / "README.md"
    if not card.is_file():
        return {}
    try:
        meta = metadata_load(card) or {}
    except Exception as exc:  # a malformed card must not stop the model from loading
        log.warning("%s: front matter not readable (%s); ignoring it", card, exc)
        return {}
    return meta if isinstance(meta, dict) else {}


def card_license(folder: Path) -> str | None:
    """The license a model's card declares (``license: creativeml-openrail-m``); a fine-tune inherits it."""
    value = card_metadata(folder).get("license")
    return value if isinstance(value, str) and value.strip() else None


def card_examples(folder: Path, limit: int = 8) -> list[str]:
    """Example prompts a model's card lists, in the Hub's widget convention (front matter ``widget: [{text: ...}]``):
    what the Generate tab offers a new visitor to click."""
    widget = card_metadata(folder).get("widget")
    texts = [w.get("text") for w in widget if isinstance(w, dict)] if isinstance(widget, list) else []
    return [" ".join(t.split())[:300] for t in texts if isinstance(t, str) and t.strip()][:limit]


def recommended_sampler(folder: Path) -> str | None:
    """The sampler (A1111 name) a model's card recommends: front matter ``sd_demo: {sampler: "Euler a"}``, since
    the Hub's widget settings have no sampler field. None when absent or not a sampler this app has."""
    from .sampling.registry import SAMPLERS

    ours = card_metadata(folder).get("sd_demo")
    value = ours.get("sampler") if isinstance(ours, dict) else None
    if value is None:
        return None
    if value not in SAMPLERS:
        log.warning("%s: sampler %r is not one of this app's samplers; using the default", folder, value)
        return None
    return value


def _card_parameter(folder: Path, name: str, kind: type, low: float, high: float):
    """One generation setting a model's card recommends, in the Hub's convention for widget settings: README.md
    front matter ``inference: {parameters: {NAME: X}}``. None when the card says nothing usable."""
    inference = card_metadata(folder).get("inference")
    params = inference.get("parameters") if isinstance(inference, dict) else None
    value = params.get(name) if isinstance(params, dict) else None
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number != float(value) or not low <= number <= high:
        log.warning("%s: %s %r is not a number from %g to %g; using the default", Path(folder) / "README.md", name,
                    value, low, high)
        return None
    return number


def recommended_guidance(folder: Path) -> float | None:
    """The CFG scale a model's card recommends (``inference.parameters.guidance_scale``), or None."""
    return _card_parameter(folder, "guidance_scale", float, 0, 50)


def recommended_steps(folder: Path) -> int | None:
    """The step count a model's card recommends (``inference.parameters.num_inference_steps``: a distilled model's
    1-8), or None."""
    from .generate import MAX_STEPS  # (generate imports this module)

    return _card_parameter(folder, "num_inference_steps", int, 1, MAX_STEPS)


def plan_download(files: list[str], repo_label: str, *, want_fp16: bool, allow_pickle: bool) -> WeightPlan:
    """Choose the weight files to fetch: safetensors, the fp16 variant when it exists and fp16 is wanted."""
    if "model_index.json" not in files:
        raise ValueError(f"'{repo_label}' is not a diffusers pipeline (no model_index.json)")
    configs = [f for f in files if any(fnmatch.fnmatch(f, p) for p in CONFIG_PATTERNS)]
    components = [c for c in WEIGHT_COMPONENTS if any(f.startswith(c + "/") for f in files)]

    def weights(comp: str, exts: tuple[str, ...]) -> list[str]:
        return [f for f in files if f.startswith(comp + "/") and f.count("/") == 1 and f.endswith(exts)]

    def pick(cands: list[str], variant: str | None) -> list[str]:
        # "diffusion_pytorch_model.fp16.safetensors" is variant fp16; sharded files carry "-0000x-of-" names.
        if variant:
            return [f for f in cands if f".{variant}." in f]
        return [f for f in cands if not any(f".{v}." in f for v in ("fp16", "bf16", "non_ema", "ema_only"))]

    safe = {c: weights(c, SAFE_WEIGHTS) for c in components}
    if not all(safe.values()):
        missing = [c for c, w in safe.items() if not w]
        if not allow_pickle:
            raise ValueError(
                f"'{repo_label}' has no safetensors weights for {', '.join(missing)} (only pickle files, which can run "
                "code when loaded); use a safetensors model, or pass --allow-pickle if you trust this repo"
            )
        return WeightPlan(configs + [f for c in components for f in pick(weights(c, PICKLE_WEIGHTS), None)], None, True)
    # Prefer the fp16 variant when fp16 is wanted; some repos ship only fp16 files, so it is also the fallback.
    order = ["fp16", None] if want_fp16 else [None, "fp16"]
    variant = next((v for v in order if all(pick(w, v) for w in safe.values())), "missing")
    if variant == "missing":
        raise ValueError(f"'{repo_label}' mixes weight variants across components; cannot pick a consistent set")
    chosen = [f for c in components for f in pick(safe[c], variant)]
    return WeightPlan(configs + chosen, variant, False)


def fetch_model(
    repo_id: str,
    revision: str | None = None,
    *,
    want_fp16: bool = False,
    allow_pickle: bool = False,
    tqdm_class=None,
) -> tuple[Path, WeightPlan]:
    """Download (or find in the cache) what a pipeline needs from a Hub repo; returns the local snapshot folder."""
    label = f"{repo_id}@{revision}" if revision else repo_id
    sizes = repo_file_sizes(repo_id, revision)
    plan = plan_download(sorted(sizes), label, want_fp16=want_fp16, allow_pickle=allow_pickle)
    if hasattr(tqdm_class, "planned"):  # progress_bar's: the bytes still to come, known before the first file
        tqdm_class.planned = sum(sizes[f] for f in plan.files if not isinstance(
            try_to_load_from_cache(repo_id, f, cache_dir=cache_dir(), revision=revision), str))
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=plan.files,
            local_files_only=is_offline(),
            cache_dir=cache_dir(),
            tqdm_class=tqdm_class,
        )
    except Exception as exc:
        raise hub_error(repo_id, revision, exc) from exc
    return Path(folder), plan


def _cached_model_repos() -> list:
    """huggingface_hub's CachedRepoInfo of every model repo in the local cache ([] before the first download)."""
    try:
        info = scan_cache_dir(cache_dir())
    except Exception:  # no cache folder yet
        return []
    return [repo for repo in info.repos if repo.repo_type == "model"]


def cached_pipelines() -> list[str]:
    """Repo ids in the local HF cache that look like diffusers pipelines (offered in the model selector)."""
    return sorted(repo.repo_id for repo in _cached_model_repos()
                  if any((Path(rev.snapshot_path) / "model_index.json").exists() for rev in repo.revisions))


def check_push(repo_id: str, token: str | None = None) -> None:
    """Refuse a push that cannot succeed before anything is trained: offline, no token, a malformed repo id.
    (Whether the token may write there only the upload can tell.)"""
    if not REPO_ID.match(repo_id or ""):
        raise ValueError(f"push: '{repo_id}' is not a Hub repo id; use 'your-name/model-name'")
    if is_offline():
        raise ValueError("push: the Hub is offline (HF_HUB_OFFLINE is set); push later with network")
    if not (token or get_token()):
        raise ValueError("push: no Hugging Face token; log in (`hf auth login`) or set HF_TOKEN")


def push_folder(repo_id: str, folder: Path, files: list[Path], *, private: bool = True,
                token: str | None = None) -> str:
    """Create (or reuse) a model repo and upload ``files`` (paths under ``folder``, uploaded at their place in it):
    only what a run wrote, never other files a user keeps in the same folder. The token: ``token`` (a Space
    visitor's own login), else HF_TOKEN / the login, which huggingface_hub reads itself; never logged or stored."""
    check_push(repo_id, token)
    api = HfApi(token=token)
    ops = [CommitOperationAdd(path_in_repo=Path(f).relative_to(folder).as_posix(), path_or_fileobj=str(f))
           for f in files]
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        # an existing repo keeps its visibility: a "private" push must not land in a public one
        if private and not api.repo_info(repo_id).private:
            raise ValueError(f"push: '{repo_id}' already exists and is public; push to a new name, or make it "
                             "private on the Hub first")
        api.create_commit(repo_id=repo_id, operations=ops, commit_message="Upload from sd_demo")
    except ValueError:
        raise
    except Exception as exc:  # auth, permissions, network: one line, never the token
        raise ValueError(f"push: could not upload to '{repo_id}': {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return str(url)


# ---------------------------------------------------------------------------------------------- the Models tab

KINDS = ("model", "lora")  # what a search looks for: diffusers text-to-image pipelines, or LoRAs for a base
SORTS = ("downloads", "likes", "trending_score", "last_modified")


@dataclass
class Found:
    repo_id: str
    downloads: int
    likes: int
    gated: bool


def search(text: str = "", kind: str = "model", base: str | None = None, sort: str = "downloads",
           limit: int = 30, public: bool = False) -> list[Found]:
    """Hub repos for the Models tab: text-to-image diffusers pipelines, or LoRAs whose base model is ``base`` (the
    loaded model's Hub id; any base when None). A public app searches without the owner's token (which would also
    list the owner's private repos to strangers). Offline: a ValueError saying so."""
    if kind not in KINDS or sort not in SORTS:
        raise ValueError(f"search: kind must be one of {', '.join(KINDS)} and sort one of {', '.join(SORTS)}")
    if is_offline():
        raise ValueError("search: the Hub is offline (HF_HUB_OFFLINE is set); the cached models are listed below")
    tags = ["diffusers", "text-to-image"] if kind == "model" else ["lora"]
    if kind == "lora" and base:
        tags.append(f"base_model:adapter:{base}")
    try:
        api = HfApi(endpoint=hf_constants.ENDPOINT, token=False if public else None)
        found = api.list_models(search=(text or "").strip() or None, filter=tags, sort=sort, limit=limit,
                                expand=["downloads", "likes", "gated"])
        return [Found(m.id, m.downloads or 0, m.likes or 0, bool(m.gated)) for m in found]
    except Exception as exc:
        raise ValueError(f"search: the Hub did not answer ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); try again") from exc


def progress_bar(on_progress):
    """A tqdm class for snapshot_download that also reports (bytes done, bytes in all, bytes per second) of the
    download to ``on_progress`` (the page's progress bar); on the terminal it draws as usual. huggingface_hub makes
    several bars (bytes written, bytes transferred, files): those counted in bytes, summed over every file, are
    reported."""
    from tqdm.auto import tqdm

    class Bar(tqdm):
        planned = 0  # bytes the download will bring, when the caller knows them (fetch_model does)

        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)
            self._reported = 0.0

        def update(self, n=1):
            out = super().update(n)
            now = time.monotonic()  # a report at most every 0.25 s: a 7 GB model is ~700 000 chunks of 10 kB
            if self.unit == "B" and self.total and (now - self._reported >= 0.25 or self.n >= self.total):
                self._reported = now  # (huggingface_hub's total grows file by file; the plan knows it first)
                on_progress(int(self.n), int(max(self.total, Bar.planned)), self.format_dict.get("rate"))
            return out

    return Bar


@dataclass
class CachedRepo:
    repo_id: str
    kind: str  # "pipeline", "LoRA", "embedding" or "other"
    size: int  # bytes on disk, every revision together
    last_used: float  # seconds since the epoch


def _kind(snapshot: Path) -> str:
    from .embeddings import is_embedding_file

    if (snapshot / "model_index.json").exists():
        return "pipeline"
    weights = sorted(snapshot.rglob("*.safetensors"))
    if not weights:
        return "other"
    try:
        return "embedding" if all(is_embedding_file(w) for w in weights) else "LoRA"
    except Exception:  # a damaged or unreadable file: still listed (and deletable)
        return "other"


def cached_repos() -> list[CachedRepo]:
    """Every model repo in the local Hugging Face cache: what it is, its size, when it was last used."""
    out = []
    for repo in _cached_model_repos():
        newest = max(repo.revisions, key=lambda r: r.last_modified, default=None)
        kind = _kind(Path(newest.snapshot_path)) if newest else "other"
        out.append(CachedRepo(repo.repo_id, kind, repo.size_on_disk, repo.last_accessed))
    return sorted(out, key=lambda r: -r.last_used)


def delete_cached(repo_id: str) -> int:
    """Delete every cached revision of a model repo; the bytes freed. Only repos of the cache are touched."""
    try:
        info = scan_cache_dir(cache_dir())
    except CacheNotFound:  # no cache folder yet: nothing of the Hub is on this machine
        info = None
    # (by membership: the cache, shared by the machine, may hold old ids without an org, as 'gpt2')
    repo = next((r for r in info.repos if r.repo_type == "model" and r.repo_id == repo_id), None) if info else None
    if repo is None:
        raise ValueError(f"delete: '{repo_id[:100]}' is not in the local Hugging Face cache; click a row of the "
                         "table")
    try:
        strategy = info.delete_revisions(*(r.commit_hash for r in repo.revisions))
        strategy.execute()
    except OSError as exc:  # its text names the cache's path
        raise ValueError(f"delete: '{repo_id}' could not be deleted ({exc.strerror or type(exc).__name__})") \
            from exc
    return strategy.expected_freed_size


def adapter_name(source: str) -> str:
    """How an image's parameters name a LoRA or embedding: its Hub id when it is a repo id or a file of the HF cache
    (``models--org--name/snapshots/REV/...``), so that PNG Info elsewhere can fetch it; else its file's or folder's
    name (never a path of this machine)."""
    if REPO_ID.match(source) and not Path(source).exists():
        return source
    parts = Path(os.path.abspath(source)).parts  # not resolve(): a snapshot file links into blobs/
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            repo_id = part[len("models--"):].replace("--", "/", 1)
            if REPO_ID.match(repo_id):
                return repo_id
    return Path(source).name


def fetch_files(repo_id: str, patterns: list[str], tqdm_class=None) -> Path:
    """The files of a repo that match ``patterns`` (from the local cache when offline); its snapshot folder."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=is_offline(),
                                      cache_dir=cache_dir(), tqdm_class=tqdm_class))
    except Exception as exc:
        raise hub_error(repo_id, None, exc) from exc


def fetch_adapter(repo_id: str, revision: str | None = None, tqdm_class=None, cached_only: bool = False) -> Path:
    """The one LoRA or embedding file of a repo (diffusers' ``pytorch_lora_weights.safetensors``, else its largest
    .safetensors; never a pickle, never the other files: a repo that keeps every epoch is gigabytes); its path.
    ``cached_only`` (or offline): the one already in the local cache."""
    if not REPO_ID.match(repo_id or ""):
        raise ValueError(f"download: '{repo_id}' is not a Hub repo id; use 'org/name'")
    local = cached_only or is_offline()
    try:
        if local:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.safetensors"],
                                            local_files_only=True, cache_dir=cache_dir()))
            sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*.safetensors")}
        else:
            info = HfApi(endpoint=hf_constants.ENDPOINT).model_info(repo_id, revision=revision, files_metadata=True)
            sizes = {s.rfilename: s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(".safetensors")}
        if not sizes:
            raise ValueError(f"download: '{repo_id}' has no .safetensors file (pickle weights are never fetched)")
        name = "pytorch_lora_weights.safetensors"
        name = name if name in sizes else max(sizes, key=sizes.get)
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=[name], local_files_only=local,
                                   cache_dir=cache_dir(), tqdm_class=tqdm_class)
    except ValueError:
        raise
    except Exception as exc:
        raise hub_error(repo_id, revision, exc) from exc
    return Path(folder) / name
