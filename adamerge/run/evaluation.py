"""A run's evaluation table: the reference rows (pretrained, each expert), the start of a learned method and the
merge, per task on the test files, with each row's attack success rate where a task has an ``attack_test`` file."""

from __future__ import annotations

from pathlib import Path


def evaluate_run(method, pool, c: dict, out_dir: Path, start_state, selection) -> dict | None:
    """Per-task test accuracy of the reference rows, the start (learned methods) and the merge; the
    table is printed and saved (eval.json). None when there is nothing to evaluate."""
    from ..evaluate import (
        load_test_sets,
        markdown,
        merge_accuracies,
        merged_rows,
        reference_rows,
        save_report,
        summarize,
    )
    from .start_vs_end import exported_note
    from .states import merged_at, merged_now

    if not c["evaluate"]["enabled"] or not pool.family.evaluated:
        return None
    tokenizer = pool.tokenizer()
    tests = load_test_sets(pool, tokenizer, c["data"]["max_length"], c["evaluate"]["max_examples"],
                           max_new_tokens=c["evaluate"]["max_new_tokens"])
    if not tests:
        return None
    bs = c["evaluate"]["batch_size"]

    def accuracies(merged: dict) -> dict[str, float]:
        return merge_accuracies(pool, merged, tests, bs)

    # attack_test files (a backdoored expert's trigger): each row's attack success rate, the ASR columns
    attacks = load_test_sets(pool, tokenizer, c["data"]["max_length"], c["evaluate"]["max_examples"], split="attack_test")
    rows, asr = {}, {}
    if c["evaluate"]["reference_rows"]:
        rows = reference_rows(pool, tests, bs)
        asr = reference_rows(pool, attacks, bs) if attacks else {}
    if start_state is not None and c["evaluate"]["start_row"]:
        start = merged_at(method, start_state)
        rows[method.start_label()] = accuracies(start)
        if attacks:
            asr[method.start_label()] = merge_accuracies(pool, start, attacks, bs)
    label, now = c["method"]["id"] + exported_note(selection), merged_now(method)
    rows.update(merged_rows(method, label, now, tests, bs))
    if attacks:
        asr[label] = merge_accuracies(pool, now, attacks, bs)
    summary = summarize(rows, asr=asr)
    save_report(summary, out_dir)
    table = markdown(summary)
    print("\n" + table + "\n", flush=True)
    return {"summary": summary, "markdown": table}
