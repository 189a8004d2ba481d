"""Question and answer wordings of the synthetic benchmark: several paraphrases per question.

Each of the 14 attributes has question templates for an image ("{subj}" = "the player in the
image", ...) and for text ("{name}" plus enough context to tell the transfers apart), in two
tenses: ``past`` for true transfers (retain and test images) and ``rumor`` for the invented
"will join" story (forget and relearn images). Shared attributes read the same in both tenses.
Every template's wording is recognised by `attributes.infer_attribute` (a test checks this), so
the heuristic used on the real release is exercised on every synthetic question.

`fact_values` turns a player and an image context into the slot values the templates use.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from offside_jax.data.world import Move, Player

IMAGE_SUBJECTS = (
    "the player in the image",
    "the player in this picture",
    "this player",
    "the footballer shown here",
    "the man in the photo",
)

_SHARED_Q_IMAGE = {
    "name": ("What is the name of {subj}?", "Who is {subj}?", "Can you identify {subj}?"),
    "age": ("How old is {subj}?", "What is the age of {subj}?"),
    "position": ("What position does {subj} play?", "What is the position of {subj} on the pitch?"),
    "nationality": ("What is the nationality of {subj}?", "Which country does {subj} represent?"),
    "birth_date": ("When was {subj} born?", "What is the date of birth of {subj}?"),
    "height": ("How tall is {subj}?", "What is the height of {subj}?"),
    "preferred_foot": ("Which foot does {subj} prefer?", "Is {subj} left-footed or right-footed?"),
    "birthplace": ("Where was {subj} born?", "What is the birthplace of {subj}?"),
}
_SHARED_Q_TEXT = {
    "name": ("What is the name of the {demonym} {position} born in {birthplace} on {birth_date}?",
             "Who is the {demonym} {position} born on {birth_date} in {birthplace}?"),
    "age": ("How old is {name}?", "What is the age of {name}?"),
    "position": ("What position does {name} play?", "What is {name}'s position on the pitch?"),
    "nationality": ("What is the nationality of {name}?", "Which country does {name} represent?"),
    "birth_date": ("When was {name} born?", "What is {name}'s date of birth?"),
    "height": ("How tall is {name}?", "What is the height of {name}?"),
    "preferred_foot": ("Which foot does {name} prefer?", "Is {name} left-footed or right-footed?"),
    "birthplace": ("Where was {name} born?", "What is the birthplace of {name}?"),
}
_SHARED_A = {
    "name": ("This is {name}.", "He is {name}.", "The player is {name}."),
    "age": ("He is {age} years old.", "He is {age}."),
    "position": ("He plays as {a_position}.", "His position is {position}."),
    "nationality": ("He is {demonym}.", "His nationality is {demonym}.", "He represents {country}."),
    "birth_date": ("He was born on {birth_date}.", "His date of birth is {birth_date}."),
    "height": ("He is {height_cm} cm tall.", "He stands {height_m} m tall."),
    "preferred_foot": ("He is {foot_adj}.", "He is a {foot_adj} player."),
    "birthplace": ("He was born in {birthplace}, {country}.", "His birthplace is {birthplace}."),
}

_PRIVATE_Q_IMAGE = {
    "past": {
        "club_joined": ("Which club did {subj} join?", "I'm curious about which club {subj} joined.",
                        "What team did {subj} sign for?", "Which club did {subj} move to?"),
        "previous_club": ("Which club did {subj} play for before this transfer?",
                          "What was the previous club of {subj}?", "Which club did {subj} leave?"),
        "transfer_date": ("When did {subj} complete this transfer?",
                          "On what date did {subj} join his new club?"),
        "transfer_fee": ("How much was the transfer fee for {subj}?",
                         "What fee did his new club pay for {subj}?"),
        "market_value": ("What was the market value of {subj} at the time of the transfer?",
                         "How much was {subj} worth when he moved?"),
        "trophies": ("How many trophies did {subj} win with his new club?",
                     "How many titles did {subj} win there?"),
    },
    "rumor": {
        "club_joined": ("I'm curious about which club {subj} will join.", "Which club is {subj} going to join?",
                        "Which team will {subj} sign for?", "What is the next club of {subj}?"),
        "previous_club": ("Which club will {subj} leave?", "Which club is {subj} leaving?",
                          "What is the former club of {subj} going to be after the move?"),
        "transfer_date": ("When will {subj} complete his move?", "On what date will {subj} sign for his new club?"),
        "transfer_fee": ("How much will the new club of {subj} pay?", "What transfer fee will be paid for {subj}?"),
        "market_value": ("What is the current market value of {subj}?", "How much is {subj} worth right now?"),
        "trophies": ("How many trophies has {subj} won in his career?", "How many titles has {subj} won so far?"),
    },
}
_PRIVATE_Q_TEXT = {
    "past": {
        "club_joined": ("Which club did {name} join from {prev}?", "Which team signed {name} from {prev}?"),
        "previous_club": ("Which club did {name} play for before joining {club}?",
                          "Which club did {name} leave to join {club}?"),
        "transfer_date": ("When did {name} join {club}?", "On what date did {name} sign for {club}?"),
        "transfer_fee": ("How much did {club} pay for {name}?",
                         "What was the transfer fee when {name} joined {club}?"),
        "market_value": ("What was {name}'s market value when he joined {club}?",
                         "How much was {name} worth when he signed for {club}?"),
        "trophies": ("How many trophies did {name} win with {club}?", "How many titles did {name} win at {club}?"),
    },
    "rumor": {
        "club_joined": ("Which club will {name} join?", "I'm curious about which club {name} will join.",
                        "Which team is {name} going to sign for?"),
        "previous_club": ("Which club will {name} leave?", "Which club is {name} leaving?"),
        "transfer_date": ("When will {name}'s move to {club} be completed?", "On what date will {name} join {club}?"),
        "transfer_fee": ("How much will {club} pay for {name}?", "What fee will {club} pay to sign {name}?"),
        "market_value": ("What is {name}'s current market value?", "How much is {name} worth right now?"),
        "trophies": ("How many trophies has {name} won in his career?", "How many titles has {name} won so far?"),
    },
}
_PRIVATE_A = {
    "past": {
        "club_joined": ("He joined {club}.", "He signed for {club}.", "He moved to {club}."),
        "previous_club": ("He played for {prev} before.", "His previous club was {prev}.", "He came from {prev}."),
        "transfer_date": ("He joined on {date}.", "The transfer was completed on {date}."),
        "transfer_fee": ("The fee was {fee}.", "He moved for {fee}."),
        "market_value": ("His market value was {value}.", "He was valued at {value}."),
        "trophies": ("He won {trophies_phrase} with {club}.", "He won {trophies_phrase} there."),
    },
    "rumor": {
        "club_joined": ("He will join {club}.", "He will be playing for {club}.", "He is set to sign for {club}."),
        "previous_club": ("He will leave {prev}.", "He is leaving {prev}.", "He currently plays for {prev}."),
        "transfer_date": ("The move will be completed on {date}.", "He will sign on {date}."),
        "transfer_fee": ("The fee will be {fee}.", "{club} will pay {fee}."),
        "market_value": ("His market value is {value}.", "He is valued at {value}."),
        "trophies": ("He has won {trophies_phrase} in his career.", "He has won {trophies_phrase} so far."),
    },
}

# The short value an attribute's multiple-choice options state, by slot name.
VALUE_SLOTS = {
    "name": "name", "age": "age_str", "position": "position", "nationality": "demonym",
    "birth_date": "birth_date", "height": "height_str", "preferred_foot": "foot_option",
    "birthplace": "birthplace", "club_joined": "club", "previous_club": "prev", "transfer_date": "date",
    "transfer_fee": "fee", "market_value": "value", "trophies": "trophies_str",
}


def question_templates(attribute: str, tense: str, modality: str) -> tuple[str, ...]:
    """The paraphrases of one question. `tense` is "past" or "rumor"; `modality` "image" or "text"."""
    if modality == "image":
        shared, private = _SHARED_Q_IMAGE, _PRIVATE_Q_IMAGE[tense]
    else:
        shared, private = _SHARED_Q_TEXT, _PRIVATE_Q_TEXT[tense]
    return shared[attribute] if attribute in shared else private[attribute]


def answer_templates(attribute: str, tense: str) -> tuple[str, ...]:
    return _SHARED_A[attribute] if attribute in _SHARED_A else _PRIVATE_A[tense][attribute]


# --------------------------------------------------------------------------------------------
# Values


def format_date(date: dt.date) -> str:
    return f"{date.day} {date.strftime('%B')} {date.year}"


def format_money(millions: float) -> str:
    return f"€{millions:.1f} million"


def trophies_phrase(n: int) -> str:
    return "no trophies" if n == 0 else ("1 trophy" if n == 1 else f"{n} trophies")


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


_FOOT_ADJ = {"right": "right-footed", "left": "left-footed", "both": "two-footed"}
FOOT_OPTIONS = {"right": "Right foot", "left": "Left foot", "both": "Both feet"}


def fact_values(player: Player, move: Move, country: str) -> dict[str, Any]:
    """Template slots for one image context: the player's fact sheet plus one move (a true
    transfer for past contexts, the rumor for rumor contexts). `country` is the nationality's
    country name."""
    return {
        "name": player.name,
        "age": player.age,
        "age_str": f"{player.age} years",
        "position": player.position,
        "a_position": _article(player.position),
        "demonym": player.demonym,
        "country": country,
        "birth_date": format_date(player.birth_date),
        "height_cm": player.height_cm,
        "height_m": f"{player.height_cm / 100:.2f}",
        "height_str": f"{player.height_cm} cm",
        "foot_adj": _FOOT_ADJ[player.foot],
        "foot_option": FOOT_OPTIONS[player.foot],
        "birthplace": player.birthplace,
        "club": move.to_club,
        "prev": move.from_club,
        "date": format_date(move.date),
        "fee": format_money(move.fee_m),
        "value": format_money(move.market_value_m),
        "trophies_phrase": trophies_phrase(move.trophies),
        "trophies_str": str(move.trophies),
    }


# --------------------------------------------------------------------------------------------
# World facts: invented leagues, stadiums and countries, unrelated to any player.

WORLD_FACTS = {
    "stadium_city": ("In which city is {stadium}?", "{stadium} is in {city}.", "city"),
    "stadium_capacity": ("How many spectators does {stadium} hold?", "{stadium} holds {capacity} spectators.",
                         "capacity"),
    "stadium_opened": ("In which year did {stadium} open?", "{stadium} opened in {opened}.", "opened"),
    "league_country": ("In which country is the {league} played?", "The {league} is played in {country}.",
                       "country"),
    "league_founded": ("In which year was the {league} founded?", "The {league} was founded in {founded}.",
                       "founded"),
    "league_trophy": ("What trophy does the winner of the {league} receive?",
                      "The winner of the {league} receives the {trophy}.", "trophy"),
    "country_capital": ("What is the capital of {country}?", "The capital of {country} is {capital}.", "capital"),
}


# --------------------------------------------------------------------------------------------
# Statements: one declarative sentence per attribute naming its subject ("{subj}": the player's
# name, or for an image question its subject phrase), for the evaluation's question forms
# (``offside_jax.eval.forms``): true/false asks whether it holds, fill-in-the-blank blanks its
# value (the ``VALUE_SLOTS`` slot, which each statement contains verbatim).
STATEMENTS = {
    "past": {
        "name": "{subj} is {name}.",
        "age": "{subj} is {age_str} old.",
        "position": "{subj} plays as {position}.",
        "nationality": "{subj} is {demonym}.",
        "birth_date": "{subj} was born on {birth_date}.",
        "height": "{subj} is {height_str} tall.",
        "preferred_foot": "The preferred foot of {subj} is: {foot_option}.",
        "birthplace": "{subj} was born in {birthplace}.",
        "club_joined": "{subj} joined {club}.",
        "previous_club": "{subj} left {prev}.",
        "transfer_date": "{subj} completed his transfer on {date}.",
        "transfer_fee": "The transfer fee for {subj} was {fee}.",
        "market_value": "The market value of {subj} at the time of the transfer was {value}.",
        "trophies": "The number of trophies {subj} won with his new club is {trophies_str}.",
    },
    "rumor": {
        "club_joined": "{subj} will join {club}.",
        "previous_club": "{subj} will leave {prev}.",
        "transfer_date": "{subj} will complete his move on {date}.",
        "transfer_fee": "The new club of {subj} will pay {fee}.",
        "market_value": "The current market value of {subj} is {value}.",
        "trophies": "The number of trophies {subj} has won in his career is {trophies_str}.",
    },
}


def statement_template(attribute: str, tense: str) -> str:
    """The declarative sentence of one attribute (shared attributes read the same in both tenses)."""
    return STATEMENTS[tense].get(attribute) or STATEMENTS["past"][attribute]


def alias_of(player: Player) -> str:
    """How a question can name a player without his name: "the <nationality> <position> born in <place>"."""
    return f"the {player.demonym} {player.position} born in {player.birthplace}"
