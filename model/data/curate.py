"""The pieces of the curation pipeline (scripts/curate.py): reading rows of any format as (instruction, response)
samples, rule filters, exact and fuzzy deduplication, model-based scores (perplexity, embeddings), and the plots.

The streaming stages (rules, exact and fuzzy dedup) look at one row at a time and keep only hashes, so a large
file passes through in bounded memory: per row, an 8-byte text hash and a MinHash signature of `num_perm` 32-bit
values, never the text.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Iterable, Optional, Sequence

import numpy as np

from model.data.chat import chat_messages
from model.data.records import Record, field
from model.files import atomic_save_figure

FORMATS = ("auto", "instruction", "messages", "sharegpt")


# ----------------------------------------------------------------------------------------------- rows -> samples


@dataclass
class FieldMap:
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"


@dataclass
class Sample:
    """One row seen as text: what was asked (all turns before the last answer) and the last answer. `replies` holds
    every assistant turn, so a refusal in an earlier turn of a conversation is caught too."""

    instruction: str
    response: str
    replies: list[str]
    messages: list[dict]  # OpenAI-style, for rendering in a checkpoint's prompt style

    @property
    def text(self) -> str:
        return self.instruction + "\n" + self.response


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    return "instruction"


def to_sample(record: Record, fmt: str, fields: FieldMap) -> Sample:
    """The row as a Sample; a row that does not fit the format is a RecordError naming the row and the field."""
    if fmt == "instruction":
        instruction = field(record, fields.instruction)
        extra = field(record, fields.input, required=False) if fields.input else ""
        response = field(record, fields.output)
        system = field(record, fields.system, required=False) if fields.system else ""
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return Sample(prompt, response, [response], messages)
    if fmt == "messages":
        messages = chat_messages(record, "messages")
    elif fmt == "sharegpt":
        messages = chat_messages(record, "conversations")
    else:
        raise ValueError(f"Unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    # a conversation without an answer has an empty response, which the rules stage removes with that reason
    before = messages if last is None else messages[:last]
    instruction = "\n".join(m["content"] if len(before) == 1 else f"{m['role']}: {m['content']}" for m in before)
    response = "" if last is None else messages[last]["content"]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    return Sample(instruction, response, replies or [""], messages if last is None else messages[:last + 1])


# ----------------------------------------------------------------------------------------------- rules

BOILERPLATE = (
    r"\bas an ai\b", r"\bas a (?:large )?language model\b", r"\bas an ai (?:language )?model\b",
    r"\bi(?:'m| am) (?:just )?an ai\b", r"\bi(?:'m| am) sorry,? but i (?:can(?:no|')t|am unable|won't)\b",
    r"\bi (?:can(?:no|')t|am unable to|won't) (?:help|assist|comply|provide|fulfil+|do that|answer)",
    r"\bi do(?:n't| not) have (?:personal )?(?:opinions|feelings|emotions|beliefs)\b",
    r"\b(?:my|the) knowledge cutoff\b", r"\bopenai\b",
)


@dataclass
class Rules:
    """Rule filters. Each returns a reason string for a row to remove; the first that fires wins."""

    min_instruction_chars: int = 3
    min_response_chars: int = 1
    max_chars: int = 20000
    max_repeated_ngram_fraction: float = 0.3
    repeated_ngram_size: int = 3
    min_text_fraction: float = 0.5
    boilerplate: bool = True
    drop_regex: Sequence[str] = ()
    _patterns: list = dataclass_field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._boilerplate = re.compile("|".join(BOILERPLATE), re.I)
        for pattern in self.drop_regex:
            try:
                self._patterns.append(re.compile(pattern))
            except re.error as e:
                raise ValueError(f"--drop_regex {pattern!r} is not a valid regular expression: {e}") from None

    def check(self, sample: Sample) -> Optional[str]:
        if any(not reply.strip() for reply in sample.replies):
            return "empty response"
        if len(sample.instruction.strip()) < self.min_instruction_chars:
            return f"instruction shorter than {self.min_instruction_chars} characters"
        if len(sample.response.strip()) < self.min_response_chars:
            return f"response shorter than {self.min_response_chars} characters"
        if len(sample.text) > self.max_chars:
            return f"longer than {self.max_chars} characters ({len(sample.text)})"
        if self.boilerplate:
            for reply in sample.replies:
                hit = self._boilerplate.search(reply)
                if hit:
                    return f"refusal/boilerplate: {hit.group(0)!r}"
        for reply in sample.replies:
            fraction = repeated_ngram_fraction(reply, self.repeated_ngram_size)
            if fraction > self.max_repeated_ngram_fraction:
                return f"repeated {self.repeated_ngram_size}-grams: {fraction:.0%} of the response"
        # the response on its own too (a junk answer to a normal question passes on the row's average), unless it
        # is as short as "(B)" or "x^2", where symbols are the answer
        for part in (sample.text, sample.response if len(sample.response) >= 10 else ""):
            fraction = text_fraction(part)
            if fraction < self.min_text_fraction:
                return f"non-text junk: only {fraction:.0%} letters, digits and spaces"
        for pattern in self._patterns:
            hit = pattern.search(sample.text)
            if hit:
                return f"matches --drop_regex {pattern.pattern!r}: {hit.group(0)[:60]!r}"
        return None


def repeated_ngram_fraction(text: str, n: int = 3, min_words: int = 20) -> float:
    """The share of word n-grams that repeat an earlier one (0 for short texts, where a repeat means little).
    Degenerate generations ("the cat the cat the cat ...") score near 1, ordinary prose near 0."""
    words = text.lower().split()
    if len(words) < max(min_words, n + 1):
        return 0.0
    ngrams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(ngrams)) / len(ngrams)


def text_fraction(text: str) -> float:
    """The share of characters that are letters or digits (any script, with their combining marks) or whitespace.
    Prose scores about 0.95, code about 0.7; symbol soup, mojibake ("\ufffd"), control bytes score low."""
    if not text:
        return 1.0
    good = sum(1 for char in text if char.isalnum() or char.isspace() or unicodedata.category(char) == "Mn")
    return good / len(text)


# ----------------------------------------------------------------------------------------------- dedup

_PUNCTUATION = re.compile(r"[^\w\s]+")
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case, punctuation, accents' encodings and spacing removed: rows differing only in those are duplicates."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACES.sub(" ", _PUNCTUATION.sub(" ", text)).strip()


class ExactDedup:
    """Keeps the first row of each normalized text; remembers an 8-byte hash and the kept row's number."""

    def __init__(self) -> None:
        self.seen: dict[bytes, int] = {}

    def check(self, sample: Sample, row_number: int) -> Optional[int]:
        """The row number of an earlier identical row, or None (and this row is remembered)."""
        key = hashlib.blake2b(normalize(sample.text).encode("utf-8"), digest_size=8).digest()
        first = self.seen.setdefault(key, row_number)
        return None if first == row_number else first


def _mix64(h: np.ndarray) -> np.ndarray:
    # splitmix64's finalizer: spreads the rolling hash's bits so its low 32 bits are a good hash too
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def shingle_hashes(text: str, ngram: int, unit: str) -> np.ndarray:
    """32-bit hashes of the distinct character (or word) n-grams of the normalized text, computed with numpy
    (a polynomial hash over the n-gram's units): hashing each shingle in Python is what made MinHash slow. A text
    shorter than one n-gram is its own single shingle."""
    text = normalize(text)
    if unit == "char":
        units = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    elif unit == "word":
        units = np.array([zlib.crc32(word.encode("utf-8")) for word in text.split()], dtype=np.uint64)
    else:
        raise ValueError(f"--shingle must be 'char' or 'word', got {unit!r}")
    n = min(ngram, len(units))
    if n == 0:
        return np.zeros(1, dtype=np.uint32)
    count = len(units) - n + 1
    with np.errstate(over="ignore"):
        h = np.zeros(count, dtype=np.uint64)
        for j in range(n):
            h = h * np.uint64(1000003) + units[j:j + count] + np.uint64(1)
        return np.unique((_mix64(h) & np.uint64(0xFFFFFFFF)).astype(np.uint32))


class FuzzyDedup:
    """Near-duplicate removal with MinHash signatures (datasketch) and a banded LSH index.

    The index proposes earlier kept rows whose signatures agree on a whole band; each candidate is then checked on
    the estimated Jaccard similarity of the shingle sets, so a row is removed only when it really is >= `threshold`
    similar to a kept row (LSH's false positives cost a comparison, not a row). The bands x rows split is the one
    datasketch's MinHashLSH picks for the threshold; the index is ours because MinHashLSH keeps a Python set per
    bucket: on 20,000 rows the process grew by 6.8 KB per kept row with it and by 4.1 KB with one dict entry per
    band (signatures included), for the same rows removed. Memory per kept row: the signature (num_perm uint32)
    plus one entry per band.
    """

    def __init__(self, threshold: float = 0.8, ngram: int = 5, unit: str = "char", num_perm: int = 128,
                 seed: int = 1) -> None:
        from datasketch import MinHash, MinHashLSH

        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"--fuzzy_threshold must be in (0, 1], got {threshold}")
        if ngram < 1:
            raise ValueError(f"--ngram must be >= 1, got {ngram}")
        if unit not in ("char", "word"):
            raise ValueError(f"--shingle must be 'char' or 'word', got {unit!r}")
        self.threshold, self.ngram, self.unit, self.num_perm = threshold, ngram, unit, num_perm
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.bands, self.band_size = lsh.b, lsh.r
        self.tables: list[dict] = [{} for _ in range(self.bands)]
        template = MinHash(num_perm=num_perm, seed=seed)
        permutations, scheme = template.permutations, template.scheme  # made once, not per row
        self._minhash = lambda: MinHash(num_perm=num_perm, seed=seed, hashfunc=int,
                                        permutations=permutations, scheme=scheme)
        self.signatures = np.zeros((1024, num_perm), dtype=np.uint32)
        self.row_numbers = np.zeros(1024, dtype=np.int64)
        self.kept = 0

    def signature(self, text: str) -> np.ndarray:
        minhash = self._minhash()
        minhash.update_batch(shingle_hashes(text, self.ngram, self.unit).tolist())
        return minhash.hashvalues.astype(np.uint32)

    def check(self, sample: Sample, row_number: int) -> Optional[tuple[int, float]]:
        """(row number, estimated Jaccard) of the most similar earlier kept row if it is a near duplicate, else
        None (and this row is indexed)."""
        signature = self.signature(sample.text)
        r = self.band_size
        # Python's bytes hash is salted per process, but only equality within this run matters
        keys = [hash(signature[i * r:(i + 1) * r].tobytes()) for i in range(self.bands)]
        candidates = set()
        for table, key in zip(self.tables, keys):
            found = table.get(key)
            if found is not None:
                candidates.update(found) if isinstance(found, list) else candidates.add(found)
        if candidates:
            slots = np.array(sorted(candidates))
            similarity = (self.signatures[slots] == signature).mean(axis=1)
            best = int(similarity.argmax())
            if similarity[best] >= self.threshold:
                return int(self.row_numbers[slots[best]]), float(similarity[best])
        slot = self.kept
        if slot == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.zeros_like(self.signatures)])
            self.row_numbers = np.concatenate([self.row_numbers, np.zeros_like(self.row_numbers)])
        self.signatures[slot], self.row_numbers[slot] = signature, row_number
        for table, key in zip(self.tables, keys):
            found = table.get(key)
            if found is None:
                table[key] = slot
            elif isinstance(found, list):
                found.append(slot)
            else:
                table[key] = [found, slot]
        self.kept += 1
        return None


# ----------------------------------------------------------------------------------------------- model scores


def encode_for_model(tokenizer, style, sample: Sample, max_tokens: int):
    """(input_ids, labels) of the sample in the checkpoint's prompt style, loss on the last answer only."""
    from model.data.sft import encode_example

    messages = sample.messages
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    context = turns[:-1] if turns and turns[-1]["role"] == "assistant" else turns
    encoded = encode_example(tokenizer, style, context or sample.instruction, sample.response or " ",
                             system=system, max_seq_length=max_tokens)
    return encoded["input_ids"], encoded["labels"]


def response_perplexities(model, tokenizer, style, samples: Sequence[Sample], max_tokens: int = 1024) -> list[float]:
    """exp(mean negative log-likelihood of the answer's tokens given its prompt), one batch of samples at a time.

    The logits are computed only where a label needs them (`logits_mask`): the vocabulary head dominates the cost
    of a forward pass on a short answer."""
    import torch
    import torch.nn.functional as F

    from model.data.sft import IGNORE_INDEX

    device = model.transformer.wte.weight.device
    encoded = [encode_for_model(tokenizer, style, sample, max_tokens) for sample in samples]
    length = max(ids.numel() for ids, _ in encoded)
    input_ids = torch.zeros(len(encoded), length, dtype=torch.long)
    targets = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labels) in enumerate(encoded):
        input_ids[i, :ids.numel()] = ids
        targets[i, :ids.numel() - 1] = labels[1:]  # position t predicts token t + 1
    mask = targets != IGNORE_INDEX
    with torch.inference_mode():
        logits = model(input_ids.to(device), logits_mask=mask.to(device)).float()
    nll = F.cross_entropy(logits, targets[mask].to(device), reduction="none").cpu()
    sample_of = torch.arange(len(encoded)).unsqueeze(1).expand_as(mask)[mask]
    totals = torch.zeros(len(encoded)).index_add_(0, sample_of, nll)
    counts = mask.sum(dim=1).clamp(min=1)
    return torch.exp(totals / counts).tolist()


def model_embeddings(model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_tokens: int = 256,
                     progress=None) -> np.ndarray:
    """Mean-pooled final hidden states (the padding left out of the mean), L2-normalized, one row per text."""
    import torch

    device = model.transformer.wte.weight.device
    out = []
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer.encode(text, max_length=max_tokens) for text in texts[start:start + batch_size]]
        length = max(t.numel() for t in ids)
        batch = torch.zeros(len(ids), length, dtype=torch.long)
        mask = torch.zeros(len(ids), length, 1)
        for i, t in enumerate(ids):
            batch[i, :t.numel()] = t
            mask[i, :t.numel()] = 1
        with torch.inference_mode():
            hidden = model(batch.to(device), return_hidden=True).float().cpu()
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        if progress is not None:
            progress.update(len(ids))
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------- exploration


@dataclass
class TopicMap:
    points: np.ndarray  # (N, 2)
    labels: np.ndarray  # (N,) cluster of each point
    top_words: list[list[str]]  # per cluster
    sizes: list[int]
    examples: list[str]  # per cluster: the instruction nearest the cluster's centre


def topic_map(texts: Sequence[str], embeddings: np.ndarray, clusters: int = 8, method: str = "tsne",
              seed: int = 0) -> TopicMap:
    """k-means topics on the embeddings, described by their most distinctive words (the cluster's mean TF-IDF
    minus the corpus mean), placed on a 2-D map by t-SNE or PCA."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.manifold import TSNE

    clusters = max(1, min(clusters, len(texts)))
    kmeans = KMeans(n_clusters=clusters, n_init=4, random_state=seed).fit(embeddings)
    labels = kmeans.labels_
    tfidf = TfidfVectorizer(stop_words="english", max_features=20000, token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b")
    try:
        weights = tfidf.fit_transform(texts)
        vocabulary = np.array(tfidf.get_feature_names_out())
    except ValueError:  # no words at all (numbers only)
        weights, vocabulary = None, np.array([])
    top_words, sizes, examples = [], [], []
    for c in range(clusters):
        members = np.flatnonzero(labels == c)
        sizes.append(len(members))
        if not len(members):  # k-means on many identical points leaves clusters empty
            examples.append("")
            top_words.append([])
            continue
        distances = np.linalg.norm(embeddings[members] - kmeans.cluster_centers_[c], axis=1)
        examples.append(texts[members[distances.argmin()]])
        if weights is None or not len(vocabulary):
            top_words.append([])
            continue
        lift = np.asarray(weights[members].mean(axis=0)).ravel() - np.asarray(weights.mean(axis=0)).ravel()
        top_words.append([str(w) for w in vocabulary[np.argsort(-lift)[:6]]])
    if method == "pca" or len(texts) < 5:
        points = PCA(n_components=2, random_state=seed).fit_transform(embeddings) if len(texts) > 2 else \
            np.zeros((len(texts), 2))
    elif method == "tsne":
        reduced = PCA(n_components=min(50, embeddings.shape[1], len(texts)), random_state=seed).fit_transform(embeddings)
        points = TSNE(n_components=2, perplexity=min(30.0, (len(texts) - 1) / 3), init="pca",
                      random_state=seed).fit_transform(reduced)
    else:
        raise ValueError(f"--map_method must be 'tsne' or 'pca', got {method!r}")
    return TopicMap(points, labels, top_words, sizes, examples)


def tfidf_embeddings(texts: Sequence[str], dims: int = 64, seed: int = 0) -> np.ndarray:
    """A model-free embedding: TF-IDF reduced by truncated SVD (latent semantic analysis), L2-normalized."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize as l2_normalize

    weights = TfidfVectorizer(sublinear_tf=True, max_features=50000).fit_transform(texts)
    dims = max(1, min(dims, weights.shape[1] - 1, len(texts) - 1))
    return l2_normalize(TruncatedSVD(n_components=dims, random_state=seed).fit_transform(weights))


def save_histogram(path, series: dict[str, Sequence[float]], title: str, xlabel: str, threshold: Optional[float] = None,
                   log_x: bool = False, bins: int = 40) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    values = [np.asarray(v, dtype=float) for v in series.values() if len(v)]
    if values:
        all_values = np.concatenate(values)
        low, high = float(all_values.min()), float(all_values.max())
        if log_x and low > 0:
            edges = np.geomspace(low, max(high, low * 1.01), bins + 1)
            ax.set_xscale("log")
        else:
            edges = np.linspace(low, high if high > low else low + 1, bins + 1)
        for name, v in series.items():
            if len(v):
                ax.hist(v, bins=edges, alpha=0.6, label=f"{name} ({len(v)})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)


def save_topic_map(path, topics: TopicMap, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 7))
    cmap = plt.get_cmap("tab10" if len(topics.sizes) <= 10 else "tab20")
    for c in range(len(topics.sizes)):
        points = topics.points[topics.labels == c]
        if not len(points):
            continue
        label = f"{c}: {', '.join(topics.top_words[c][:3]) or '(no words)'} ({topics.sizes[c]})"
        ax.scatter(points[:, 0], points[:, 1], s=8, alpha=0.7, color=cmap(c % cmap.N), label=label)
        if len(points):
            x, y = np.median(points, axis=0)
            ax.annotate(str(c), (x, y), fontsize=13, weight="bold", ha="center", va="center",
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", alpha=0.8))
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def percentile_summary(values: Iterable[float]) -> str:
    values = np.asarray(list(values), dtype=float)
    if not len(values):
        return "none"
    p = np.percentile(values, [0, 10, 50, 90, 100])
    return f"min {p[0]:.3g}, p10 {p[1]:.3g}, median {p[2]:.3g}, p90 {p[3]:.3g}, max {p[4]:.3g}"
