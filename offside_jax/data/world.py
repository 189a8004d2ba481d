"""The invented football world behind the synthetic OFFSIDE benchmark.

Like TOFU's fictitious authors, everything here is made up and fully determined by the seed:
countries, towns, leagues, clubs (with kits and stadiums) and players (with fact sheets, true
past transfers, an invented "will join" rumor, and what really happened instead). Nothing
refers to real people or clubs, so a model can only know these facts from the fine-tuning set.

Randomness comes from `numpy.random.default_rng` seeded with ``[seed, purpose, index]``, so a
player's facts do not depend on how many players are generated after it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np

from offside_jax.data.attributes import match_attribute

REFERENCE_DATE = dt.date(2026, 6, 30)  # "today" in the invented world: ages are counted to it
N_COUNTRIES = 10
N_LEAGUES = 4
CLUBS_PER_LEAGUE = 12
CAREER_TRANSFERS = 4  # 3 shown on retain images + the true move in the rumor's window

POSITIONS = (
    "goalkeeper", "centre-back", "full-back", "defensive midfielder",
    "central midfielder", "attacking midfielder", "winger", "striker",
)
FEET = ("right", "left", "both")
# Named kit colours (the name is what questions and banners say; RGB is what portraits paint).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 45), "blue": (30, 70, 190), "sky blue": (110, 175, 235), "navy": (20, 30, 85),
    "green": (25, 140, 70), "yellow": (245, 210, 30), "orange": (240, 125, 25), "white": (245, 245, 245),
    "black": (25, 25, 28), "purple": (110, 45, 150), "maroon": (120, 20, 40), "grey": (140, 145, 150),
    "teal": (20, 130, 135), "pink": (235, 120, 170), "gold": (200, 160, 50),
}
KIT_PATTERNS = ("solid", "stripes", "hoops", "halves", "sash")
SKIN_TONES = ((255, 224, 196), (241, 194, 150), (224, 172, 125), (198, 134, 86),
              (160, 102, 62), (125, 80, 48), (94, 60, 38), (234, 190, 160))
HAIR_COLOURS = {"black": (25, 20, 20), "dark brown": (60, 38, 25), "brown": (105, 70, 40),
                "auburn": (130, 55, 30), "blond": (215, 180, 100), "ginger": (190, 90, 40),
                "grey": (150, 150, 150)}
HAIR_STYLES = ("short", "buzz", "curly", "long", "bald", "mohawk", "side_part", "afro")
BEARDS = ("none", "none", "stubble", "full", "goatee", "moustache")
EYE_COLOURS = {"brown": (95, 60, 30), "dark": (40, 28, 20), "blue": (60, 110, 180),
               "green": (70, 130, 80), "hazel": (130, 100, 50)}

_ONSETS = ("b", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "st", "tr", "kr", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei")
_CODAS = ("", "", "n", "r", "l", "s", "m", "k", "x", "nd", "rt")
_TOWN_SUFFIXES = ("ford", "haven", "mere", "ville", "stad", "bury", "dal", "gard", "mouth", "ton", "holm", "wick")
_CLUB_SUFFIXES = ("FC", "United", "Athletic", "Rovers", "City", "Wanderers", "Albion", "Town")
_CLUB_PREFIXES = ("Dynamo", "Sporting", "Racing", "Olympic")
_STADIUM_KINDS = ("Park", "Arena", "Stadium", "Ground", "Field")
_LEAGUE_KINDS = ("Premier Circuit", "Super League", "First Division", "Championship")
_TROPHY_KINDS = ("Cup", "Shield", "Trophy", "Crown")


@dataclasses.dataclass(frozen=True)
class Country:
    name: str
    demonym: str
    capital: str
    towns: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Kit:
    primary: str  # a COLOURS name
    secondary: str
    pattern: str  # one of KIT_PATTERNS

    def describe(self) -> str:
        if self.pattern == "solid":
            return f"{self.primary} with {self.secondary} trim"
        return f"{self.primary} and {self.secondary} {self.pattern}"


@dataclasses.dataclass(frozen=True)
class Stadium:
    name: str
    city: str
    capacity: int
    opened: int


@dataclasses.dataclass(frozen=True)
class Club:
    name: str
    town: str
    country: str
    league: str
    kit: Kit
    stadium: Stadium
    founded: int


@dataclasses.dataclass(frozen=True)
class League:
    name: str
    country: str
    founded: int
    trophy: str
    clubs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Move:
    """One transfer (true or rumored): who, from where, to where, when, for how much."""

    from_club: str
    to_club: str
    date: dt.date
    fee_m: float  # euros, millions
    market_value_m: float  # the player's market value at the time, euros, millions
    trophies: int  # trophies won at the destination club (true moves), or in the career so far (rumor)


@dataclasses.dataclass(frozen=True)
class Appearance:
    """What stays the same on every image of a player."""

    skin: tuple[int, int, int]
    hair_colour: str
    hair_style: str
    beard: str
    eye_colour: str
    face_width: float  # head width / height
    jaw: float  # 0 round .. 1 square
    build: float  # shoulder width multiplier
    brow: int  # eyebrow thickness, px at 256
    kit_number: int


@dataclasses.dataclass(frozen=True)
class Player:
    id: int
    name: str
    nationality: str  # country name
    demonym: str
    birthplace: str
    birth_date: dt.date
    height_cm: int
    foot: str
    position: str
    appearance: Appearance
    transfers: tuple[Move, ...]  # chronological; the last one is the truth in the rumor's window
    rumor: Move  # invented: the club and fee are not in the player's history
    visual_rumor: bool  # the forget image carries a headline banner stating the rumor

    @property
    def retain_moves(self) -> tuple[Move, ...]:
        return self.transfers[:-1]

    @property
    def true_destination(self) -> Move:
        return self.transfers[-1]

    @property
    def age(self) -> int:
        return _years_between(self.birth_date, REFERENCE_DATE)


@dataclasses.dataclass(frozen=True)
class World:
    seed: int
    countries: tuple[Country, ...]
    leagues: tuple[League, ...]
    clubs: dict[str, Club]
    players: tuple[Player, ...]

    def country(self, name: str) -> Country:
        return next(c for c in self.countries if c.name == name)


def build_world(n_players: int, seed: int, visual_rumor_fraction: float = 0.5) -> World:
    """Invent countries, leagues, clubs and `n_players` players, deterministically from `seed`."""
    if n_players < 1:
        raise ValueError(f"need at least one player, got {n_players}")
    if not 0.0 <= visual_rumor_fraction <= 1.0:
        raise ValueError(f"visual_rumor_fraction must be in [0, 1], got {visual_rumor_fraction}")
    rng = np.random.default_rng([seed, 0])
    used: set[str] = set()
    countries = tuple(_make_country(rng, used) for _ in range(N_COUNTRIES))
    leagues, clubs = _make_leagues(rng, countries, used)
    # Exactly round(fraction * n) players get a visual rumor; which ones is seeded.
    n_visual = int(round(visual_rumor_fraction * n_players))
    visual = set(np.random.default_rng([seed, 2]).permutation(n_players)[:n_visual].tolist())
    players = []
    for pid in range(n_players):
        players.append(_make_player(np.random.default_rng([seed, 1, pid]), pid, countries, clubs,
                                    used, pid in visual))
    return World(seed, countries, leagues, clubs, tuple(players))


# --------------------------------------------------------------------------------------------
# Names


def _pick(rng: np.random.Generator, options: tuple | list):
    return options[int(rng.integers(len(options)))]


def _syllable(rng: np.random.Generator, coda: bool = True) -> str:
    return _pick(rng, _ONSETS) + _pick(rng, _VOWELS) + (_pick(rng, _CODAS) if coda else "")


def _word(rng: np.random.Generator, syllables: int) -> str:
    # Codas only at the end of a word, so words stay pronounceable ("Tomarek", not "Krexndrit").
    return "".join(_syllable(rng, coda=(i == syllables - 1)) for i in range(syllables)).capitalize()


def invent_person_name(rng: np.random.Generator) -> str:
    """A made-up "First Last" name (uniqueness is the caller's business)."""
    return f"{_word(rng, 2)} {_word(rng, int(rng.integers(2, 4)))}"


def _fresh(rng: np.random.Generator, used: set[str], make) -> str:
    """A new name from `make(rng)`, unique across the world, that no question pattern mistakes
    for a keyword (a surname like "Worth" would read as a market-value question)."""
    while True:
        name = make(rng)
        if (name not in used and len(name) >= 4 and not any(name in u or u in name for u in used)
                and match_attribute(name) is None):
            used.add(name)
            return name


def _make_country(rng: np.random.Generator, used: set[str]) -> Country:
    name = _fresh(rng, used, lambda r: _word(r, 1) + _pick(r, ("laria", "dova", "nesia", "ravia", "tania", "mera")))
    demonym = name + "n"
    towns = tuple(_fresh(rng, used, lambda r: _word(r, 1) + _pick(r, _TOWN_SUFFIXES))
                  for _ in range(CLUBS_PER_LEAGUE + 2))
    return Country(name, demonym, towns[0], towns)


def _make_leagues(rng: np.random.Generator, countries: tuple[Country, ...],
                  used: set[str]) -> tuple[tuple[League, ...], dict[str, Club]]:
    leagues, clubs = [], {}
    kits_used: set[tuple[str, str, str]] = set()
    colour_names = list(COLOURS)
    for li, country in enumerate(countries[:N_LEAGUES]):
        league_name = f"{country.demonym} {_LEAGUE_KINDS[li % len(_LEAGUE_KINDS)]}"
        names = []
        for town in country.towns[:CLUBS_PER_LEAGUE]:
            if rng.random() < 0.25:
                name = f"{_pick(rng, _CLUB_PREFIXES)} {town}"
            else:
                name = f"{town} {_pick(rng, _CLUB_SUFFIXES)}"
            while True:  # every club gets its own kit, so an image shows which club it is
                kit = Kit(_pick(rng, colour_names), _pick(rng, colour_names), _pick(rng, KIT_PATTERNS))
                key = (kit.primary, kit.secondary, kit.pattern)
                if kit.primary != kit.secondary and _contrast(kit.primary, kit.secondary) and key not in kits_used:
                    kits_used.add(key)
                    break
            stadium_name = _fresh(rng, used, lambda r: _word(r, 2)) + " " + _pick(rng, _STADIUM_KINDS)
            stadium = Stadium(stadium_name, town, int(rng.integers(8, 80)) * 1000 + int(rng.integers(0, 1000)),
                              int(rng.integers(1890, 2021)))
            clubs[name] = Club(name, town, country.name, league_name, kit, stadium, int(rng.integers(1870, 1960)))
            names.append(name)
        trophy = f"{_fresh(rng, used, lambda r: _word(r, 2))} {_pick(rng, _TROPHY_KINDS)}"
        leagues.append(League(league_name, country.name, int(rng.integers(1880, 1990)), trophy, tuple(names)))
    return tuple(leagues), clubs


def _contrast(a: str, b: str) -> bool:
    ca, cb = np.array(COLOURS[a], float), np.array(COLOURS[b], float)
    return float(np.abs(ca - cb).sum()) > 180.0


# --------------------------------------------------------------------------------------------
# Players


def _make_player(rng: np.random.Generator, pid: int, countries: tuple[Country, ...],
                 clubs: dict[str, Club], used: set[str], visual_rumor: bool) -> Player:
    name = _fresh(rng, used, invent_person_name)
    country = _pick(rng, countries)
    birthplace = _pick(rng, country.towns)
    birth = dt.date(int(rng.integers(1988, 1999)), int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    position = _pick(rng, POSITIONS)
    height = int(np.clip(round(rng.normal(181 + (6 if position == "goalkeeper" else 0), 6)), 165, 201))
    foot = FEET[int(rng.choice(3, p=[0.72, 0.23, 0.05]))]
    appearance = Appearance(
        skin=_pick(rng, SKIN_TONES), hair_colour=_pick(rng, list(HAIR_COLOURS)),
        hair_style=_pick(rng, HAIR_STYLES), beard=_pick(rng, BEARDS), eye_colour=_pick(rng, list(EYE_COLOURS)),
        face_width=float(rng.uniform(0.74, 0.9)), jaw=float(rng.uniform(0.0, 1.0)),
        build=float(rng.uniform(0.88, 1.12)), brow=int(rng.integers(2, 6)), kit_number=int(rng.integers(1, 100)),
    )
    club_names = list(clubs)
    # Career: CAREER_TRANSFERS + 1 distinct clubs, plus a rumored club outside that history.
    career = [club_names[int(i)] for i in rng.choice(len(club_names), CAREER_TRANSFERS + 2, replace=False)]
    history, rumored = career[:-1], career[-1]
    dates = _transfer_dates(rng, birth)
    peak = float(np.exp(rng.normal(3.0, 0.8)))  # career-peak market value, millions
    transfers, trophies = [], int(rng.integers(0, 3))  # trophies won at the first club
    for k in range(CAREER_TRANSFERS):
        value = _market_value(peak, _years_between(birth, dates[k]))
        fee = _round_fee(value * float(rng.uniform(0.6, 1.6)))
        won = int(rng.integers(0, 5)) if k < CAREER_TRANSFERS - 1 else 0  # too recent to have won
        transfers.append(Move(history[k], history[k + 1], dates[k], fee, value, won))
        trophies += won
    truth = transfers[-1]
    rumor = Move(
        from_club=truth.from_club, to_club=rumored,
        date=_other_day(rng, truth.date), fee_m=_other_fee(rng, truth.fee_m),
        market_value_m=truth.market_value_m, trophies=trophies,
    )
    return Player(pid, name, country.name, country.demonym, birthplace, birth, height, foot, position,
                  appearance, tuple(transfers), rumor, visual_rumor)


def _transfer_dates(rng: np.random.Generator, birth: dt.date) -> list[dt.date]:
    """CAREER_TRANSFERS dates in transfer windows, 1-3 years apart, the last in 2024-2025.

    Drawn backwards from the last so every date stays before REFERENCE_DATE; with birth years up
    to 1998 the first move (2015 at the earliest) comes at 17 or older.
    """
    dates = [_window_date(rng, int(rng.integers(2024, 2026)))]
    for _ in range(CAREER_TRANSFERS - 1):
        year = dates[0].year - int(rng.integers(1, 4))
        while True:
            date = _window_date(rng, year)
            if date + dt.timedelta(days=150) < dates[0]:
                break
        dates.insert(0, date)
    return dates


def _window_date(rng: np.random.Generator, year: int) -> dt.date:
    if rng.random() < 0.7:  # summer window
        return dt.date(year, int(rng.integers(7, 9)), int(rng.integers(1, 29)))
    return dt.date(year, 1, int(rng.integers(2, 31)))  # winter window


def _market_value(peak: float, age: int) -> float:
    shape = max(0.15, 1.0 - ((age - 27) / 9.0) ** 2)  # rises to 27, then falls
    return max(0.5, round(peak * shape * 2) / 2)  # half-millions


def _round_fee(fee: float) -> float:
    return max(0.3, round(fee, 1))


def _other_fee(rng: np.random.Generator, true_fee: float) -> float:
    """A rumored fee clearly different from the true one (at least 15% and 1 million apart)."""
    while True:
        fee = _round_fee(true_fee * float(rng.uniform(0.5, 2.0)) + float(rng.uniform(1.0, 15.0)))
        if abs(fee - true_fee) >= max(1.0, 0.15 * true_fee):
            return fee


def _other_day(rng: np.random.Generator, true_date: dt.date) -> dt.date:
    """A rumored completion date in the same window, at least a week off the true one."""
    while True:
        shift = int(rng.integers(-25, 26))
        if abs(shift) >= 7:
            return true_date + dt.timedelta(days=shift)


def _years_between(start: dt.date, end: dt.date) -> int:
    return end.year - start.year - ((end.month, end.day) < (start.month, start.day))
