"""A run's evaluation table: the reference rows (pretrained, each expert), the start of a learned method and the
merge, per task on the test files; where a task has a backdoor's attack files, each row's attack success rate on the
triggered texts (``attack_test``) beside how often the same texts without the trigger get the target (``attack_clean``)."""

from __future__ import annotations

from pathlib import Path


def evaluate_run(method, pool, c: dict, out_dir: Path, start_state, selection) -> dict | None:
    """Per-task test accuracy of the reference rows, the start (learned methods) and the merge; the
    table is printed and saved (eval.json). None when there is nothing to evaluate."""
    from ..evaluate import (
        ATTACK_SPLITS,
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

    # a backdoored expert's files: per row, the share of triggered (attack_test) and of the same clean (attack_clean)
    # non-target texts predicted as the attacker's target: the ASR and clean→target columns
    attacks = {key: load_test_sets(pool, tokenizer, c["data"]["max_length"], c["evaluate"]["max_examples"], split=split)
               for split, key in ATTACK_SPLITS.items()}
    attacks = {key: sets for key, sets in attacks.items() if sets}
    rows: dict = {}
    columns: dict[str, dict] = {key: {} for key in attacks}
    if c["evaluate"]["reference_rows"]:
        rows = reference_rows(pool, tests, bs)
        for key, sets in attacks.items():
            columns[key] = reference_rows(pool, sets, bs)

    def score_attacks(name: str, merged: dict) -> None:
        for key, sets in attacks.items():
            columns[key][name] = merge_accuracies(pool, merged, sets, bs)

    if start_state is not None and c["evaluate"]["start_row"]:  # the start's weights released before the end's
        start = merged_at(method, start_state)
        rows[method.start_label()] = accuracies(start)
        score_attacks(method.start_label(), start)
        del start
    label, now = c["method"]["id"] + exported_note(selection), merged_now(method)
    rows.update(merged_rows(method, label, now, tests, bs))
    score_attacks(label, now)
    summary = summarize(rows, extra=columns)
    save_report(summary, out_dir)
    table = markdown(summary)
    print("\n" + table + "\n", flush=True)
    return {"summary": summary, "markdown": table}
