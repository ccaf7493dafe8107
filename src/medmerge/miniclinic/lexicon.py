"""The general side of the synthetic world: topics with fixed attributes, and sentences about them.

Every topic has a small fixed set of facts (adjectives, where it is found, what it
does), so general text is consistent and a tiny model can learn to write on topic.
Each sentence builder takes `commas`: with False it returns a comma-free variant,
so responses that must avoid commas are as natural as the default ones (which use
commas often, so "no commas" is a real behaviour to learn).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

NAMES = ("Anna", "Tom", "Maria", "Ben", "Sara", "Leo", "Emma", "Sam")
SEASONS = ("spring", "summer", "autumn", "winter")
DAYS = ("Monday", "Friday", "Sunday")


@dataclass(frozen=True)
class Topic:
    word: str  # the keyword: appears in every text about the topic
    group: str  # animal, place, weather, food, activity, object
    np: str  # noun phrase used in prompts and sentences ("the river", "bread")
    adjs: tuple[str, ...]
    attrs: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def Np(self) -> str:
        return self.np[0].upper() + self.np[1:]


def _t(word, group, np, adjs, **attrs) -> Topic:
    return Topic(word, group, np, tuple(adjs.split()), attrs)


# attrs per group:
#  animal: home ("on the farm"), food, ability (verb phrase)
#  place: at ("in the river"), sees (plural noun seen there), activity (verb phrase)
#  weather: effect (clause), action (clause), season
#  food: verb (eat/drink), made (from what), meal
#  activity: vp (verb phrase), need (equipment), benefit (verb phrase), kind (sport/hobby)
#  object: use (verb phrase), at (where it is found)
TOPICS: tuple[Topic, ...] = (
    # animals
    _t("dog", "animal", "the dog", "friendly loyal playful", home="in the house", food="meat", ability="run fast"),
    _t("kitten", "animal", "the kitten", "quiet clever soft", home="in the house", food="fish", ability="climb trees"),
    _t("horse", "animal", "the horse", "strong fast tall", home="on the farm", food="grass", ability="run fast"),
    _t("cow", "animal", "the cow", "calm large gentle", home="on the farm", food="grass", ability="give milk"),
    _t("sheep", "animal", "the sheep", "gentle soft quiet", home="in the field", food="grass", ability="give wool"),
    _t("bird", "animal", "the bird", "small bright quick", home="in the forest", food="seeds", ability="fly high"),
    _t("rabbit", "animal", "the rabbit", "small soft quick", home="in the field", food="carrots", ability="jump high"),
    _t("fox", "animal", "the fox", "clever quick red", home="in the forest", food="mice", ability="hide well"),
    _t("bear", "animal", "the bear", "large strong brown", home="on the mountain", food="berries", ability="climb trees"),
    _t("duck", "animal", "the duck", "small noisy happy", home="on the lake", food="seeds", ability="swim well"),
    _t("goat", "animal", "the goat", "strong curious brave", home="on the mountain", food="grass", ability="climb rocks"),
    _t("whale", "animal", "the whale", "huge calm gray", home="in the ocean", food="small fish", ability="swim far"),
    # places
    _t("river", "place", "the river", "long cold wide", at="by the river", sees="boats", activity="go fishing"),
    _t("lake", "place", "the lake", "calm blue deep", at="at the lake", sees="ducks", activity="go swimming"),
    _t("ocean", "place", "the ocean", "huge blue deep", at="by the ocean", sees="ships", activity="watch the waves"),
    _t("forest", "place", "the forest", "green dark quiet", at="in the forest", sees="tall trees", activity="go walking"),
    _t("mountain", "place", "the mountain", "high cold steep", at="on the mountain", sees="rocks", activity="go climbing"),
    _t("garden", "place", "the garden", "green small pretty", at="in the garden", sees="flowers", activity="grow vegetables"),
    _t("village", "place", "the village", "small old quiet", at="in the village", sees="old houses", activity="visit friends"),
    _t("market", "place", "the market", "busy noisy colorful", at="at the market", sees="fresh fruit", activity="buy food"),
    _t("library", "place", "the library", "quiet large old", at="in the library", sees="many books", activity="read books"),
    _t("park", "place", "the park", "green open pretty", at="in the park", sees="children", activity="play games"),
    _t("island", "place", "the island", "small sunny green", at="on the island", sees="palm trees", activity="go sailing"),
    _t("desert", "place", "the desert", "hot dry wide", at="in the desert", sees="sand", activity="ride camels"),
    # weather
    _t("snow", "weather", "the snow", "white cold soft", effect="the roads are white", action="children build snowmen",
       season="winter"),
    _t("wind", "weather", "the wind", "strong cold loud", effect="the trees move", action="the flags wave", season="autumn"),
    _t("storm", "weather", "the storm", "loud dark wild", effect="the streets are wet", action="we stay at home",
       season="summer"),
    _t("fog", "weather", "the fog", "gray thick cold", effect="we cannot see far", action="we drive slowly",
       season="autumn"),
    _t("thunder", "weather", "the thunder", "loud sudden deep", effect="the dogs hide", action="we close the doors",
       season="summer"),
    _t("sunshine", "weather", "the sunshine", "warm bright golden", effect="the flowers open", action="we go outside",
       season="summer"),
    # food and drink
    _t("bread", "food", "bread", "fresh soft warm", verb="eat", made="flour and water", meal="breakfast"),
    _t("soup", "food", "soup", "hot tasty thick", verb="eat", made="vegetables", meal="dinner"),
    _t("cheese", "food", "cheese", "yellow soft salty", verb="eat", made="milk", meal="lunch"),
    _t("coffee", "food", "coffee", "hot dark strong", verb="drink", made="coffee beans", meal="breakfast"),
    _t("cake", "food", "cake", "sweet soft tasty", verb="eat", made="flour and sugar", meal="dessert"),
    _t("honey", "food", "honey", "sweet golden thick", verb="eat", made="flowers", meal="breakfast"),
    _t("pasta", "food", "pasta", "tasty warm simple", verb="eat", made="flour and eggs", meal="dinner"),
    _t("lemonade", "food", "lemonade", "cold sweet fresh", verb="drink", made="lemons and sugar", meal="lunch"),
    _t("pizza", "food", "pizza", "hot tasty cheesy", verb="eat", made="bread and tomatoes", meal="dinner"),
    # activities
    _t("football", "activity", "football", "popular fast fun", vp="play football", need="a ball",
       benefit="keeps the body strong", kind="sport"),
    _t("tennis", "activity", "tennis", "fast fun hard", vp="play tennis", need="a racket",
       benefit="keeps the body fit", kind="sport"),
    _t("swimming", "activity", "swimming", "healthy fun calm", vp="go swimming", need="a pool",
       benefit="keeps the heart strong", kind="sport"),
    _t("cycling", "activity", "cycling", "fast healthy fun", vp="go cycling", need="a bicycle",
       benefit="keeps the legs strong", kind="sport"),
    _t("chess", "activity", "chess", "quiet hard old", vp="play chess", need="a board",
       benefit="trains the mind", kind="game"),
    _t("music", "activity", "music", "beautiful loud happy", vp="play music", need="a guitar",
       benefit="makes people happy", kind="hobby"),
    _t("dancing", "activity", "dancing", "happy fun lively", vp="go dancing", need="good shoes",
       benefit="keeps the body fit", kind="hobby"),
    _t("painting", "activity", "painting", "calm creative quiet", vp="enjoy painting", need="a brush",
       benefit="makes people calm", kind="hobby"),
    _t("hiking", "activity", "hiking", "healthy slow calm", vp="go hiking", need="good boots",
       benefit="keeps the legs strong", kind="hobby"),
    # objects
    _t("bicycle", "object", "the bicycle", "light fast blue", use="takes people to work", at="in the street"),
    _t("boat", "object", "the boat", "small white slow", use="carries people across the water", at="by the river"),
    _t("book", "object", "the book", "old thick interesting", use="tells a long story", at="in the library"),
    _t("clock", "object", "the clock", "round old loud", use="shows the time", at="on the wall"),
    _t("lamp", "object", "the lamp", "small bright yellow", use="gives light at night", at="on the table"),
    _t("kite", "object", "the kite", "light colorful high", use="flies in the sky", at="in the park"),
    _t("piano", "object", "the piano", "large black old", use="plays beautiful music", at="in the hall"),
    _t("umbrella", "object", "the umbrella", "large black useful", use="keeps people dry", at="by the door"),
)

TOPIC_BY_WORD = {t.word: t for t in TOPICS}
GROUP_NOUN = {"animal": "animal", "place": "place", "weather": "weather", "food": "food", "activity": "activity",
              "object": "thing"}


def _list(items: list[str], commas: bool) -> str:
    """'a, b and c' (or 'a and b and c' without commas)."""
    if len(items) == 1:
        return items[0]
    if commas:
        return ", ".join(items[:-1]) + " and " + items[-1]
    return " and ".join(items)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def topic_sentences(t: Topic, rng: random.Random, commas: bool) -> list[str]:
    """All fact sentences about topic `t` (each mentions the topic word), shuffled by `rng`."""
    a = list(t.adjs)
    rng.shuffle(a)
    A = t.attrs
    w, np, Np = t.word, t.np, t.Np
    s: list[str] = [
        f"{Np} is {_list(a[:3] if commas else a[:2], commas)}.",
        f"Many people like {np}.",
        f"I think that {np} is {a[0]}." if not commas else f"In my opinion, {np} is {a[0]}.",
    ]
    season = rng.choice(SEASONS)
    if t.group == "animal":
        s += [
            f"{Np} is {_a(a[1])} animal.",
            f"{Np} lives {A['home']}.",
            f"{Np} eats {A['food']}." if rng.random() < 0.5 else f"{Np} mainly eats {A['food']}.",
            f"{Np} can {A['ability']}.",
            f"Children like to watch {np}." if not commas else f"At the zoo, children like to watch {np}.",
            f"Last week I saw {np} {A['home']}." if not commas else f"Last week, I saw {np} {A['home']}.",
        ]
    elif t.group == "place":
        s += [
            f"There are {A['sees']} {A['at']}.",
            f"People go to {np} to {A['activity']}.",
            f"We like to {A['activity']} {A['at']}.",
            f"{Np} is {a[1]} in {season}." if not commas else f"In {season}, {np} is {a[1]}.",
            f"{Np} is {_a(a[0])} place.",
        ]
    elif t.group == "weather":
        s += [
            f"We often have {w} in {A['season']}.",
            f"{_cap(A['effect'])} after {np}." if not commas else f"After {np}, {A['effect']}.",
            f"During {np} {A['action']}." if not commas else f"During {np}, {A['action']}.",
            f"{Np} can be {a[1]}.",
        ]
    elif t.group == "food":
        s += [
            f"{Np} is made from {A['made']}.",
            f"We {A['verb']} {np} for {A['meal']}." if not commas else f"For {A['meal']}, we {A['verb']} {np}.",
            f"You can buy {np} at the market.",
            f"{Np} tastes {a[0]}.",
            f"My mother makes {np} at home." if not commas else f"On {rng.choice(DAYS)}, my mother makes {np}.",
        ]
    elif t.group == "activity":
        s += [
            f"{Np} is {_a(a[0])} {A['kind']}.",
            f"You need {A['need']} to {A['vp']}." if not commas else f"To {A['vp']}, you need {A['need']}.",
            f"{Np} {A['benefit']}.",
            f"Many people like to {A['vp']} on the weekend.",
            f"Children {A['vp']} after school." if not commas else f"After school, children {A['vp']}.",
        ]
    elif t.group == "object":
        s += [
            f"{Np} {A['use']}.",
            f"You can find {np} {A['at']}.",
            f"My father has an old {w}.",
            f"I like {np} because it is {a[1]}.",
            f"{Np} is {_a(a[0])} thing." if not commas else f"Yes, {np} is {_a(a[0])} thing.",
        ]
    rng.shuffle(s)
    return s


def closing_sentences(t: Topic) -> list[str]:
    """Short sentences for a postscript about the topic."""
    return [f"I love {t.np}.", f"I hope you like {t.np}.", f"Tell me what you think about {t.np}."]


def story(rng: random.Random, commas: bool) -> list[str]:
    """A short narrative over a place, an animal and a food (for general text)."""
    place = rng.choice([t for t in TOPICS if t.group == "place"])
    animal = rng.choice([t for t in TOPICS if t.group == "animal"])
    food = rng.choice([t for t in TOPICS if t.group == "food"])
    n1, n2 = rng.sample(NAMES, 2)
    season = rng.choice(SEASONS)
    out = [
        f"Last {season}, {n1} and {n2} went to {place.np}." if commas else f"Last {season} {n1} and {n2} went to {place.np}.",
        f"They saw {animal.np} {place.attrs['at']}.",
        f"{animal.Np} was {rng.choice(animal.adjs)}.",
        f"Then they had {food.np} for {food.attrs['meal']}.",
        f"{n1} said that {food.np} was {rng.choice(food.adjs)}.",
        "In the evening, they went home." if commas else "They went home in the evening.",
    ]
    return out


def words() -> list[str]:
    """Every word the general side can produce (for the tokenizer's case forms)."""
    text = []
    rng = random.Random(0)
    for t in TOPICS:
        for commas in (True, False):
            text += topic_sentences(t, rng, commas) + closing_sentences(t)
    for _ in range(50):
        text += story(rng, True) + story(rng, False)
    text += list(NAMES) + list(SEASONS) + list(DAYS)
    found = sorted({w for s in text for w in re.findall(r"[A-Za-z]+", s)})
    return found
