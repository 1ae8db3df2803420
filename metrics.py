"""WER (jiwer) and corpus BLEU (sacreBLEU) after Whisper's EnglishTextNormalizer, whose version is
printed with every result. Keys as NeMo logs them: `wer`, `txt_bleu`, `asr_bleu`, `{key}_{name}`."""
from importlib.metadata import version

import jiwer
import sacrebleu
from whisper_normalizer.english import EnglishTextNormalizer

NORMALIZER = f"Whisper EnglishTextNormalizer (whisper-normalizer {version('whisper-normalizer')})"
_normalizer = EnglishTextNormalizer()


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, numbers as digits, British spellings as American, no fillers."""
    return _normalizer(text)


def word_errors(references: list[str], hypotheses: list[str]) -> dict[str, int]:
    """Corpus counts after `normalize_text`: substitutions, deletions, insertions, ref_words."""
    references = [normalize_text(r) for r in references]
    hypotheses = [normalize_text(h) for h in hypotheses]
    counts = {"substitutions": 0, "deletions": 0, "insertions": 0,
              "ref_words": sum(len(r.split()) for r in references)}
    if references:
        out = jiwer.process_words(references, hypotheses)
        counts.update(substitutions=out.substitutions, deletions=out.deletions,
                      insertions=out.insertions)
    return counts


def wer_details(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus WER and its insertion, deletion and substitution rates (each per reference word)."""
    counts = word_errors(references, hypotheses)
    n = max(counts["ref_words"], 1)
    rates = {"ins": counts["insertions"] / n, "del": counts["deletions"] / n,
             "sub": counts["substitutions"] / n}
    return {"wer": sum(rates.values()), **rates, "ref_words": counts["ref_words"]}


def wer(references: list[str], hypotheses: list[str]) -> float:
    return wer_details(references, hypotheses)["wer"]


def bleu(references: list[str], hypotheses: list[str]) -> float:
    """sacreBLEU corpus BLEU (0-100) of one hypothesis per reference, after `normalize_text`."""
    references = [normalize_text(r) for r in references]
    hypotheses = [normalize_text(h) for h in hypotheses]
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def metrics_by_dataset(key: str, pairs: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """(reference, hypothesis) pairs per dataset -> `{key}_{name}` each and `{key}`, their mean."""
    score = wer if key == "wer" else bleu if key.endswith("bleu") else None
    if score is None:
        raise ValueError(f"unknown metric '{key}': use wer or a *bleu key")
    out = {f"{key}_{name}": score([r for r, _ in p], [h for _, h in p])
           for name, p in pairs.items()}
    out[key] = sum(out.values()) / max(len(out), 1)
    return out
