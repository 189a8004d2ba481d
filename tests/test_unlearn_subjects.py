"""Forget subjects read from the questions: hand-built records with known names."""
from __future__ import annotations

from offside_jax.data.offside import Example
from offside_jax.unlearn.subjects import capitalised_runs, forget_subjects, subject_of


def record(question: str, player: int | None, modality: str = "text") -> Example:
    return Example(setting="pure_text", split="forget", index=0, source="f.json", kind="qa", modality=modality,
                   question=question, answer="-", player_id=player)


def test_runs_skip_the_first_word_and_drop_possessives():
    assert capitalised_runs("What is Raishar Jeitradin's position on the pitch?") == [
        "Raishar", "Raishar Jeitradin", "Jeitradin"]
    assert capitalised_runs("Which club will Ana Sol join from FC Porto?") == [
        "Ana", "Ana Sol", "Sol", "FC", "FC Porto", "Porto"]
    assert capitalised_runs("Where was he born?") == []


def test_the_name_is_the_run_in_most_questions():
    questions = ["Which club will Ana Sol join?", "How much will Sporting Vale pay for Ana Sol?",
                 "When was Ana Sol born?", "Which club does Sporting Vale play?"]
    # "Ana Sol" (3 questions) beats "Sporting Vale" (2); among the 3-question runs the longest wins.
    assert subject_of(questions) == "Ana Sol"
    assert subject_of(["Where was he born?"]) is None


def test_one_subject_per_forget_player_with_retain_questions_as_context():
    forget = [record("Which club will Ana Sol join?", 0), record("Which club will Bo Lind join?", 1),
              record("When will the move of the player in this image happen?", 2, "image")]
    retain = [record("How old is Ana Sol?", 0), record("Where was Bo Lind born?", 1),
              record("Which club did Bo Lind leave?", 1), record("How tall is Cy Moor?", 3)]
    assert forget_subjects(forget, retain) == ["Ana Sol", "Bo Lind"]  # player 2 is never named; 3 is not forgotten
    assert forget_subjects([record("Which club will Ana Sol join?", None)]) == []
