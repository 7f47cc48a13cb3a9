import json
from pathlib import Path

import pytest

from tidal.config import ArithmeticData, ConfigError, CountingData, DataConfig, FileData
from tidal.data import arithmetic_splits, counting_splits, encode_prompts, exact_match, format_prompt, load_splits
from tidal.model.loading import build_char_tokenizer

pytestmark = pytest.mark.unit


def test_arithmetic_answers_are_correct_and_splits_disjoint() -> None:
    cfg = ArithmeticData(digits=2, num_operands=3, ops=["+", "-", "*"], train_size=500, eval_size=50, seed=3)
    train, held = arithmetic_splits(cfg)
    assert len(train) == 500 and len(held) == 50
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    for r in train[:100] + held:
        expr = r["prompt"].removesuffix("=")
        assert int(r["answer"]) == eval(expr)  # noqa: S307 - test oracle
        assert all(len(n) <= 2 for n in expr.replace("-", "+").replace("*", "+").split("+"))


def test_arithmetic_is_deterministic_and_difficulty_changes_problems() -> None:
    a = arithmetic_splits(ArithmeticData(seed=1, train_size=20, eval_size=5))
    b = arithmetic_splits(ArithmeticData(seed=1, train_size=20, eval_size=5))
    c = arithmetic_splits(ArithmeticData(seed=2, train_size=20, eval_size=5))
    assert a == b and a != c
    hard, _ = arithmetic_splits(ArithmeticData(digits=4, train_size=200, eval_size=5))
    assert max(len(r["prompt"]) for r in hard) > 7


def test_eval_split_too_large_for_problem_space() -> None:
    with pytest.raises(ConfigError, match="eval_size"):
        arithmetic_splits(ArithmeticData(digits=1, num_operands=2, ops=["+"], eval_size=80))


def test_counting_answers_are_long_uneven_and_correct() -> None:
    """The long task's defaults: answers of tens of tokens at the median (one character is one token of
    the presets' tokenizer), p99 over 8x the median, the longest past 1,000; each row's own cap on new
    tokens leaves room for its answer and the end of sequence."""
    train, held = counting_splits(CountingData())
    assert len(train) == 20000 and len(held) == 200
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    tok = build_char_tokenizer()
    lengths = sorted(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) for r in train)
    median, p99 = lengths[len(lengths) // 2], lengths[int(0.99 * len(lengths))]
    assert 10 <= median < 100 and p99 >= 8 * median and lengths[-1] > 1000, (median, p99, lengths[-1])
    for r in train[:200] + held:
        a, b = (int(x) for x in r["prompt"].removeprefix("count ").removesuffix(":").split(" to "))
        assert 0 <= a <= b <= 999
        assert r["answer"].split(" ") == [str(x) for x in range(a, b + 1)]
        assert r["max_new_tokens"] == len(r["answer"]) + 8
    assert counting_splits(CountingData(train_size=10, eval_size=5)) == counting_splits(
        CountingData(train_size=10, eval_size=5)
    )


def test_counting_refuses_what_cannot_be_drawn() -> None:
    with pytest.raises(ValueError, match="max_count=50 numbers do not fit"):
        CountingData(max_count=50, max_value=20)
    with pytest.raises(ConfigError, match="eval_size=30 distinct"):
        counting_splits(CountingData(max_count=2, max_value=3, eval_size=30))


@pytest.mark.parametrize(
    "completion, answer, ok",
    [("46", "46", True), (" 46 ", "46", True), ("46x", "46", False), ("4", "46", False), ("-3", "-3", True)],
)
def test_exact_match(completion: str, answer: str, ok: bool) -> None:
    assert exact_match(completion, answer) is ok


def test_files_jsonl_and_parquet_with_custom_fields(tmp_path: Path) -> None:
    rows = [{"q": f"{i}+1=", "a": i + 1, "level": i % 3} for i in range(10)]
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    import datasets

    datasets.Dataset.from_list(rows[:4]).to_parquet(str(tmp_path / "eval.parquet"))
    cfg = DataConfig(
        source=FileData(
            train_files=[str(f)],
            eval_files=[str(tmp_path / "eval.parquet")],
            prompt_field="q",
            answer_field="a",
            metadata_fields=["level"],
        )
    )
    train, held = load_splits(cfg)
    assert train.num_rows == 10 and held is not None and held.num_rows == 4
    assert train[3] == {"prompt": "3+1=", "answer": "4", "level": 0}
    assert held[1]["answer"] == "2"


def test_files_missing_column_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"question": "1+1=", "answer": "2"}))
    cfg = DataConfig(source=FileData(train_files=[str(f)]))
    with pytest.raises(ConfigError, match=r"column\(s\) \['prompt'\] not found; the files have"):
        load_splits(cfg)


def test_chat_template_and_prompt_limit() -> None:
    tok = build_char_tokenizer()
    assert format_prompt(tok, "1+1=", chat_template=False) == "1+1="
    assert format_prompt(tok, "1+1=", chat_template=True) == "<|user|>1+1=<|assistant|>"
    ids = encode_prompts(tok, [{"prompt": "1+1="}], DataConfig(chat_template=True))[0]
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>") and len(ids) == 6
    with pytest.raises(ConfigError, match="max_prompt_tokens=3"):
        encode_prompts(tok, [{"prompt": "1+1="}], DataConfig(max_prompt_tokens=3))


def test_char_tokenizer_round_trip() -> None:
    tok = build_char_tokenizer()
    text = "12 + 34 = 46\nok!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
