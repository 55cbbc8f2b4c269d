"""Write recipes/data/verifiable.jsonl: verifiable instructions for the rule judge minitpo.verifiable.

Consumes the hand-written base tasks below (25 per category, written for this project: half ask for
a list, half for prose) and a fixed seed. Produces one JSON object per line,
{"instruction", "category", "constraints"}, where instruction = base task + " " + the rendered
constraint sentences and constraints = [[kind, args], ...] in that order, which is exactly what
minitpo.verifiable.constraints_of reads back. Deterministic: rerunning rewrites the same file.

    python recipes/data/make_verifiable.py
"""

import json
import random
from pathlib import Path

from minitpo.verifiable import KINDS, render, words

SEED = 0
OUT = Path(__file__).with_name("verifiable.jsonl")

# Per category: (tasks that ask for a list, tasks that ask for prose). No task states a count or a
# length, so that a bullets or word-limit constraint never contradicts it.
TASKS = {
    "marketing": ([
        "Give ideas for promoting a new neighborhood coffee shop.",
        "Suggest ways a small bookstore can attract more young readers.",
        "List reasons a customer might choose a local bakery over a supermarket.",
        "Suggest names for a dog-walking business.",
        "Give tips for writing a product description for an online shop.",
        "Suggest ways a gym can keep its members coming back.",
        "List selling points of a reusable water bottle.",
        "Give ideas for a summer sale at a clothing store.",
        "Suggest ways a farmers market stall can stand out from its neighbors.",
        "List features to highlight when advertising a budget smartphone.",
        "Give tips for a small business that wants to use social media well.",
        "Suggest slogans for a bicycle repair shop.",
        "List ways a restaurant can get more positive reviews.",
    ], [
        "Write a short advertisement for a handmade candle shop.",
        "Describe the ideal customer for an electric scooter rental service.",
        "Write a product description for a waterproof hiking backpack.",
        "Write a short radio advertisement for a car wash.",
        "Explain why word of mouth matters for a small business.",
        "Write a welcome message for new subscribers to a plant shop newsletter.",
        "Describe how a lemonade stand could compete with a cafe across the street.",
        "Write a short pitch for an app that helps people find lost pets.",
        "Explain what a brand logo should communicate.",
        "Write a short announcement for the grand opening of a pizza place.",
        "Describe a marketing campaign for a library's summer reading program.",
        "Write a catchy introduction for a travel agency's website.",
    ]),
    "health": ([
        "Give tips for drinking more water during the day.",
        "Suggest simple stretches for people who sit at a desk all day.",
        "List habits that help people fall asleep faster.",
        "Give ideas for healthy snacks to bring to work.",
        "Suggest ways to reduce stress before an exam.",
        "List signs that someone may need more sleep.",
        "Give tips for starting a walking routine.",
        "Suggest ways to eat more vegetables without noticing.",
        "List ways to protect your skin on a sunny day.",
        "Give tips for keeping your eyes healthy while using screens.",
        "Suggest ways to stay active indoors on a rainy day.",
        "List benefits of washing your hands often.",
        "Give tips for protecting your back while carrying a heavy bag.",
    ], [
        "Explain why breakfast can help people concentrate.",
        "Describe what happens to the body during a night of deep sleep.",
        "Explain why regular exercise is good for the heart.",
        "Describe how to prepare for a first visit to a dentist.",
        "Explain why people should warm up before running.",
        "Explain how sugar affects teeth.",
        "Describe a relaxing evening routine for a busy parent.",
        "Explain why morning sunlight can help people wake up.",
        "Describe how to help a friend who feels lonely.",
        "Explain why too much caffeine can be a problem.",
        "Explain what a balanced meal looks like.",
        "Describe the benefits of taking short breaks during work.",
    ]),
    "general_knowledge": ([
        "List facts about the planet Mars that would surprise a child.",
        "Give reasons why people celebrate the new year.",
        "List famous landmarks in Europe and what they are known for.",
        "Name animals that live in the Arctic and say how they stay warm.",
        "List inventions that changed everyday life.",
        "Give facts about the Pacific Ocean.",
        "List ways people told the time before clocks existed.",
        "Name musical instruments and describe the sound of each.",
        "List reasons why the Great Wall of China was built.",
        "Give facts about honeybees.",
        "List birthday traditions from around the world.",
        "Name sports played at the Olympic Games and say what makes each one hard.",
        "List differences between a city and a village.",
    ], [
        "Explain why we have leap years.",
        "Explain what a calendar is and why people need one.",
        "Describe how the postal service delivers a letter.",
        "Explain why the sky looks blue during the day.",
        "Explain what a museum does.",
        "Describe the life of a lighthouse keeper a hundred years ago.",
        "Explain how a library organizes its books.",
        "Explain why some countries drive on the left side of the road.",
        "Describe what a passport is used for.",
        "Explain how the Olympic Games began.",
        "Explain why maps usually put north at the top.",
        "Describe a typical working day for a firefighter.",
    ]),
    "science": ([
        "List the states of matter and give an example of each.",
        "Give examples of simple machines found at home.",
        "List reasons why plants need sunlight.",
        "Give facts about the moon that anyone can observe.",
        "List ways animals adapt to living in the desert.",
        "Give examples of renewable sources of energy.",
        "List materials that conduct electricity and materials that do not.",
        "Give examples of chemical changes that happen in the kitchen.",
        "List the parts of a flower and what each part does.",
        "Give reasons why the ocean is salty.",
        "Give facts about the planets of the solar system.",
        "Give examples of how magnets are used in everyday life.",
        "List ways to save energy at school.",
    ], [
        "Explain how a rainbow forms.",
        "Explain why ice floats on water.",
        "Describe the water cycle.",
        "Explain how bees help plants grow fruit.",
        "Explain what gravity does.",
        "Describe how a caterpillar becomes a butterfly.",
        "Explain why we see lightning before we hear thunder.",
        "Explain how the heart pumps blood.",
        "Explain why leaves change color in autumn.",
        "Describe what a volcano is and why it erupts.",
        "Explain how sound travels through the air.",
        "Explain what causes the seasons.",
    ]),
    "cooking": ([
        "Give tips for cooking rice that is not sticky.",
        "List the ingredients for a simple vegetable soup.",
        "Suggest toppings for a homemade pizza.",
        "Give tips for keeping bread fresh for longer.",
        "List ways to use leftover rice.",
        "Suggest breakfasts that can be made in a few minutes.",
        "Give tips for cutting onions without crying.",
        "List spices that go well with roasted vegetables.",
        "Suggest ways to make a salad more filling.",
        "Give tips for baking soft cookies.",
        "List kitchen tools every beginner cook should own.",
        "Suggest sandwich fillings that children will enjoy.",
        "Give tips for cooking pasta well.",
    ], [
        "Explain how to make a cup of tea properly.",
        "Describe how to make scrambled eggs.",
        "Explain why bread dough needs to rise.",
        "Describe your idea of a perfect picnic lunch.",
        "Explain how to tell when a banana is ripe.",
        "Describe how to make a simple tomato sauce.",
        "Explain why cooked meat should rest before it is cut.",
        "Describe the smell and taste of bread straight from the oven.",
        "Explain how to make pancakes from scratch.",
        "Describe how to make a fruit smoothie.",
        "Explain why salt is added to pasta water.",
        "Describe a dish that someone can cook on a camping trip.",
    ]),
    "travel": ([
        "Give tips for packing a small suitcase for a week away.",
        "List things to do on a rainy day in a new city.",
        "Suggest ways to save money while traveling.",
        "Give tips for a long train journey.",
        "List items to bring on a day hike.",
        "Suggest ways to meet local people when visiting another country.",
        "Give tips for sleeping on a plane.",
        "List things to check before leaving on a road trip.",
        "Suggest activities for a family holiday at the beach.",
        "Give tips for learning a few words of a new language before a trip.",
        "List ways to stay safe while traveling alone.",
        "Suggest souvenirs that are easy to carry home.",
        "Give tips for traveling with a young child.",
    ], [
        "Describe a perfect day in a small mountain town.",
        "Write a short postcard message from a seaside village.",
        "Explain why some travelers prefer trains to planes.",
        "Describe arriving at a busy airport for the first time.",
        "Explain how to find a place to eat in an unfamiliar town.",
        "Describe a night market in a big city.",
        "Explain why it is useful to carry a paper map.",
        "Describe a camping trip by a lake.",
        "Explain how jet lag affects people.",
        "Describe a walk through an old city at sunrise.",
        "Explain what travelers should know about tipping in restaurants.",
        "Describe the view from the top of a tall tower.",
    ]),
    "writing": ([
        "Give tips for writing a clear email to a teacher.",
        "Suggest ideas for a short story about a talking animal.",
        "List ways to make a speech more interesting.",
        "Give tips for writing the opening sentence of a story.",
        "Suggest titles for a story about a lost kite.",
        "List common mistakes in school essays.",
        "Give tips for keeping a daily journal.",
        "Suggest topics for a blog about gardening.",
        "List ways to overcome writer's block.",
        "Give tips for writing a thank-you note.",
        "Suggest names for the characters of a fantasy adventure.",
        "List questions to ask when interviewing a grandparent for a story.",
        "Give tips for editing your own writing.",
    ], [
        "Write a short story about a robot who learns to paint.",
        "Write a short poem about the first snow of winter.",
        "Write a thank-you note to a neighbor who watered your plants.",
        "Write a short story about a child who finds a map in an old book.",
        "Describe a busy kitchen on a holiday morning.",
        "Write a short fable about a patient turtle.",
        "Write a letter to your future self.",
        "Describe an old tree in a city park.",
        "Write a short story about a dragon who is afraid of the dark.",
        "Write a diary entry from a cat's point of view.",
        "Describe a thunderstorm seen from a window.",
        "Write a short story about two friends building a treehouse.",
    ]),
    "technology": ([
        "Give tips for creating a strong password.",
        "List ways to make a phone battery last longer.",
        "Suggest ways to keep a laptop running fast.",
        "Give tips for taking better photos with a phone.",
        "List signs that an email might be a scam.",
        "Suggest ways to reduce screen time in the evening.",
        "Give tips for backing up important files.",
        "List things to consider when buying a new laptop.",
        "Suggest ways to keep children safe online.",
        "Give tips for a smooth video call.",
        "List uses of a spreadsheet at home.",
        "Suggest ways to organize the files on a computer.",
        "Give tips for learning to type faster.",
    ], [
        "Explain what the internet is to someone who has never used it.",
        "Explain how a search engine finds web pages.",
        "Describe what a computer virus is.",
        "Explain what cloud storage means.",
        "Explain how a GPS navigator knows where you are.",
        "Describe how a touchscreen works.",
        "Explain what an app is.",
        "Explain why software updates matter.",
        "Describe how a robot vacuum cleaner moves around a room.",
        "Explain what Wi-Fi is.",
        "Explain what a QR code does.",
        "Describe how electric cars differ from petrol cars.",
    ]),
    "personal_finance": ([
        "Give tips for saving money on groceries.",
        "List ways a student can earn a little extra money.",
        "Suggest ways to cut monthly household bills.",
        "Give tips for making a simple monthly budget.",
        "List questions to ask before making a big purchase.",
        "Suggest ways to save for a holiday.",
        "Give tips for avoiding impulse buying.",
        "List reasons to keep an emergency fund.",
        "Suggest cheap hobbies that are still fun.",
        "Give tips for teaching children about money.",
        "List ways to spend less on transport.",
        "Give tips for paying off a small debt.",
        "Suggest ways to use less energy at home and lower the bill.",
    ], [
        "Explain what a budget is and why it helps.",
        "Explain the difference between a need and a want.",
        "Explain how interest on a savings account works.",
        "Explain why it is risky to borrow money you cannot pay back.",
        "Describe how someone could plan a birthday party on a small budget.",
        "Explain what a credit score is.",
        "Explain why comparing prices before buying is worthwhile.",
        "Describe a simple way to track spending for a month.",
        "Explain what inflation means for everyday shopping.",
        "Explain why people save for retirement.",
        "Explain what a receipt is for and why you might keep it.",
        "Describe how a piggy bank can teach a child to save.",
    ]),
    "education": ([
        "Give tips for studying for a math test.",
        "List ways to remember new vocabulary words.",
        "Suggest ways to make homework time less stressful.",
        "Give tips for taking notes in class.",
        "List ways parents can help children enjoy reading.",
        "Suggest fun ways to learn the multiplication tables.",
        "Give tips for giving a presentation in front of a class.",
        "List benefits of learning a second language.",
        "Suggest projects for a school science fair.",
        "Give tips for staying focused while studying.",
        "List ways to prepare for the first day at a new school.",
        "Suggest ways a teacher can make a history lesson exciting.",
        "Give tips for working well in a group project.",
    ], [
        "Explain why reading every day helps students.",
        "Explain how a student can plan a week of study.",
        "Describe what makes a teacher inspiring.",
        "Explain why asking questions in class is useful.",
        "Explain how to write a short book report.",
        "Describe a school field trip to a science museum.",
        "Explain why sleep matters for learning.",
        "Explain how flash cards help with memorizing.",
        "Describe what students learn from playing a team sport.",
        "Explain the purpose of homework.",
        "Explain why it is okay to make mistakes when learning.",
        "Describe a classroom that helps students learn.",
    ]),
}

# Topical words to require, per category (never the word to avoid, never in a phrase below).
KEYWORDS = {
    "marketing": ["customers", "brand", "quality", "local", "friendly", "price", "community", "offer"],
    "health": ["water", "sleep", "energy", "body", "habit", "rest", "doctor", "calm"],
    "general_knowledge": ["history", "people", "world", "ancient", "famous", "country", "tradition", "century"],
    "science": ["energy", "light", "heat", "earth", "nature", "experiment", "air", "scientists"],
    "cooking": ["salt", "taste", "heat", "fresh", "minutes", "flavor", "kitchen", "pan"],
    "travel": ["map", "local", "journey", "ticket", "adventure", "hotel", "weather", "explore"],
    "writing": ["story", "character", "reader", "voice", "page", "idea", "ending", "feeling"],
    "technology": ["data", "screen", "device", "internet", "safe", "battery", "user", "computer"],
    "personal_finance": ["money", "budget", "save", "spending", "bank", "goal", "month", "plan"],
    "education": ["learn", "student", "practice", "teacher", "notes", "class", "focus", "lesson"],
}
FORBIDDEN = ["very", "really", "good", "important", "things", "great", "also", "just", "best", "easy"]
START_PHRASES = ["Here is my answer:", "Sure thing!", "Let me explain.", "Here you go:", "Happy to help!"]
END_PHRASES = ["Thanks for reading.", "Stay curious!", "That is all for now.", "Hope this helps.",
               "Have a nice day!", "Any questions?"]

LIST_ONLY = {"bullets", "json"}
PROSE_ONLY = {"paragraphs"}
# Pairs that contradict each other or make numbers interact badly for a small model.
CLASHES = [{"lowercase", "uppercase"}, {"max_words", "min_words"}, {"bullets", "paragraphs"},
           {"bullets", "max_sentences"}, {"paragraphs", "max_sentences"}, {"paragraphs", "max_words"},
           {"min_words", "max_sentences"}, {"title", "paragraphs"}, {"title", "start_with"}]
CLASHES += [{case, phrase} for case in ("lowercase", "uppercase") for phrase in ("start_with", "end_with")]
CLASHES += [{"json", k} for k in KINDS if k not in ("json", "max_words", "min_words", "keywords", "forbidden_word")]


def allowed(kind: str, chosen: list[str], is_list: bool) -> bool:
    if kind in chosen or (kind in LIST_ONLY and not is_list) or (kind in PROSE_ONLY and is_list):
        return False
    return all({kind, other} not in CLASHES for other in chosen)


def pick_kinds(rng: random.Random, counts: dict[str, int], is_list: bool) -> list[str]:
    """2 (65%) or 3 (35%) kinds, never 1: with one constraint the K candidates often all meet it (or all
    miss it) and tie, which leaves the instruction without a pair. Each time the least used allowed kind,
    ties at random, so every kind ends up used about equally often."""
    n = 2 if rng.random() < 0.65 else 3
    chosen = []
    for _ in range(n):
        options = [k for k in KINDS if allowed(k, chosen, is_list)]
        fewest = min(counts[k] for k in options)
        chosen.append(rng.choice([k for k in options if counts[k] == fewest]))
        counts[chosen[-1]] += 1
    return chosen


def pick_args(rng: random.Random, kind: str, kinds: list[str], task: str, category: str):
    task_words = {w.lower() for w in words(task)}
    if kind == "max_words":  # room for 3-5 bullets or a title when the answer has them
        return rng.choice([40, 50, 60, 80] if "bullets" in kinds else [20, 25, 30, 40, 50, 60, 80])
    if kind == "min_words":
        return rng.choice([20, 25, 30, 40, 50, 60])
    if kind == "max_sentences":
        return rng.randint(2, 5)
    if kind == "bullets":
        return rng.randint(2, 5)
    if kind == "paragraphs":
        return rng.choice([1, 2, 2, 3, 3])
    if kind == "keywords":
        pool = [w for w in KEYWORDS[category] if w not in task_words]
        return rng.sample(pool, rng.choice([1, 2, 2, 3]))
    if kind == "forbidden_word":
        return rng.choice([w for w in FORBIDDEN if w not in task_words])
    if kind == "start_with":
        return rng.choice(START_PHRASES)
    if kind == "end_with":
        return rng.choice(END_PHRASES)
    return None


def build() -> list[dict]:
    rng = random.Random(SEED)
    counts = {k: 0 for k in KINDS}
    rows = []
    for category, (list_tasks, prose_tasks) in TASKS.items():
        # List and prose tasks alternate, so that the list-only kinds do not bunch up at the start.
        tasks = [t for pair in zip(list_tasks, prose_tasks) for t in pair] + list_tasks[len(prose_tasks):]
        for task in tasks:
            kinds = pick_kinds(rng, counts, is_list=task in list_tasks)
            constraints = [[k, pick_args(rng, k, kinds, task, category)] for k in kinds]
            instruction = " ".join([task] + [render(k, args) for k, args in constraints])
            rows.append({"instruction": instruction, "category": category, "constraints": constraints})
    return rows


if __name__ == "__main__":
    rows = build()
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} instructions to {OUT}")
