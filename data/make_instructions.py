"""Generate data/instructions.json: the offline instruction-tuning set, in Alpaca format plus three keys.

    {"instruction": "...", "input": "...", "output": "...",     # Alpaca's three (input may be "")
     "kind": "plural", "answer": "boxes", "item": "box"}         # what the scorer and the split rule use

`answer` is the key answer that a correct response contains (scored by instructions.score_answer); `item` is the
word, number or fact the question is about. Loaders read only Alpaca's three keys and ignore the rest.

Two families of kinds, because they answer different questions about fine-tuning:
- RULE kinds: the answer follows from the prompt by a rule the examples show (regular plurals, past tenses and
  comparatives, capital letters, parity, the next number, the larger number, thousands separators, yes/no
  questions, negation, the last word). A model can learn the rule and apply it to words it never saw.
- FACT kinds: the answer is a fact about the world (capitals, animal classes, antonyms). Nothing in the prompt
  gives it away; a model that never saw the fact can only guess.

The split rule: the file is written as train, validation, test (85% / 5% / 10%, the split train.py makes in file
order), and every test item is new: no test item of a kind (word, number, country, animal, sentence) occurs in
the train or validation part of that kind. So the test split measures whether a rule was learned, not
whether an answer was memorised; and the fact kinds in it are facts fine-tuning never showed.

Deterministic (its own seeded random.Random): running it again gives a byte-identical file.

    python data/make_instructions.py            # writes data/instructions.json
    python data/make_instructions.py --out DIR  # writes DIR/instructions.json

Written for nanoQLoRA; covered by the project's licence. All word lists and facts are typed in this file.
"""

import argparse
import json
import os
import random
from collections import Counter

SEED = 1234
FILENAME = "instructions.json"
TEST_ITEMS_PER_KIND = 16  # 15 kinds x 16 = 240 test examples, ~10% of the file
TRAIN_FRAC, VAL_FRAC = 0.85, 0.05  # the split train.py makes (instructions.split_examples)

# ---------------------------------------------------------------------------------------------- word lists

NOUNS = """cat dog book chair table pen cup car tree house bird road ship song door window river farm hill lamp coat
shoe hat desk bag ring bell boat card coin drum flag gate goat hand kite lake map nest pond rock rope seed star tent
tool wall bottle bucket button candle carpet castle cloud cookie dragon engine forest garden hammer island jacket
kitten ladder lemon letter magnet market mirror monster needle orange packet parrot pencil picture pillow planet
pocket rabbit rocket saddle basket shirt sister spider stone street sweater ticket tiger tower turtle wagon whistle
wizard apple banana bicycle blanket camera doctor dollar farmer finger flower friend guitar helmet insect lizard
machine mountain number ocean onion painter pebble pepper pirate puzzle rainbow robot sailor school signal spoon
stamp student teacher thunder trumpet uncle violin wallet worker zipper acorn anchor arrow badge barrel beard
blossom board bridge brother cabin cable canoe carrot cart chain cliff clock collar corner cousin crown desert
diamond dinner eagle elbow farm feather fence field frog ghost glove hook horse jewel kettle kingdom lantern leg
lion marble meadow melon mitten moment monkey motor napkin nurse oven owl paddle palace pearl pilot pin plate poem
post puppet queen rat record river robe saucer scarf shadow shell shovel skirt sled snake sock sofa storm sword
tablet thumb tulip tunnel valley vase village wheel window wing wolf yard""".split()
NOUNS_ES = """box fox bus dish brush church watch match glass class kiss wish beach bench branch bush peach lunch tax
wax coach torch sandwich witch ditch switch flash crash dress cross boss pass address princess actress compass
fax mix index ax inch patch batch punch porch""".split()
NOUNS_Y = """city baby party story lady family country berry cherry penny puppy pony hobby body copy diary spy army
enemy library factory candy daisy duty jelly lily battery bakery cookery county lorry nanny poppy ruby ferry
colony melody memory mystery navy pastry query remedy rivalry salary strawberry theory trophy trolley""".split()
NOUNS_Y = [w for w in NOUNS_Y if w[-2] not in "aeiou"]  # trolley -> trolleys follows the plain -s rule
NOUNS_VOWEL_Y = "day key toy boy valley monkey tray play guy ray donkey jockey turkey chimney alley journey highway".split()

VERBS = """walk talk jump play open help look cook clean paint visit finish watch kick climb pull push call answer
ask paint fix mix wash wish brush rest laugh learn listen melt pick plant pour print rain reach remember rock roll
rush sail search shout sign smell snow spell start stay talk thank touch turn wait want warn work yell count crawl
dream drown enjoy fill float follow form gather greet guard hand hunt jog kick kiss land last lift lock mark mend
miss obey offer order own pack park pass point pray press pretend pump punch reach rent repeat return sort spray
suck test toss train travel trick trust twist vanish wander weigh whisper wink wonder borrow collect connect
correct crash depend deliver discover explain gather happen interest invent knock""".split()
VERBS_E = """dance smile bake close hope like love move save share use wave race hike joke invite arrive bounce change
chase choose compare complete decide describe dine divide escape excuse explore fade glue guide hate hire imagine
juggle live manage measure nudge paste place prepare produce promise raise receive refuse relate remove rescue
retire scare score serve shave skate slide sneeze solve squeeze stare store suppose surprise taste tickle trace
trade tumble type unite vote whistle wipe wrestle""".split()
VERBS_Y = "cry try study carry hurry worry marry copy reply bury apply deny dry fry tidy spy envy pity rely supply".split()

ADJECTIVES = """tall small long short fast slow cold warm old young high low kind loud quick rich poor smart soft strong
weak deep dark clean clear cheap bright fresh great hard light neat plain proud quiet sharp sweet thick tough wild
bold brief broad calm cool damp dull fair firm green harsh lean mild near new odd quick round rough slight smooth
soon stark steep stiff strict swift tight vast weird""".split()
ADJECTIVES_E = "large nice wide late safe brave close cute fine pale pure rare ripe rude simple gentle wise loose huge strange".split()
ADJECTIVES_Y = """happy easy busy early funny heavy lucky pretty angry dirty noisy sunny tiny windy crazy empty friendly
hungry lazy messy muddy silly sleepy sticky tidy ugly wealthy healthy chilly cloudy""".split()

CAPS_WORDS = """apple river garden window yellow purple silver forest rocket candle winter summer market planet dragon
honey lemon pepper tiger zebra violin guitar piano castle bridge island meadow orange banana cherry mango olive
copper marble pillow mirror basket button jacket kettle ladder pencil ticket wallet thunder shadow sunset harbor
village canyon desert glacier lantern compass anchor feather arrow saddle trumpet hammer needle spider turtle
parrot rabbit kitten puppy falcon badger beaver otter walrus camel llama donkey bread butter cheese cookie cream
pasta salad sugar tomato potato carrot onion garlic spinach""".split()

# Sentences for the yes/no-question, negation and last-word kinds: people and animals can do things; things only
# have states. (subject, is-or-are)
PEOPLE = [("my brother", "is"), ("the teacher", "is"), ("your sister", "is"), ("the baby", "is"), ("our neighbor", "is"),
          ("the doctor", "is"), ("my friend", "is"), ("the dog", "is"), ("he", "is"), ("she", "is"), ("the kids", "are"),
          ("my parents", "are"), ("our friends", "are"), ("the students", "are"), ("the players", "are"), ("they", "are"),
          ("we", "are"), ("the twins", "are")]
THINGS = [("the shop", "is"), ("the soup", "is"), ("the train", "is"), ("the garden", "is"), ("my phone", "is"),
          ("the door", "is"), ("the room", "is"), ("the road", "is"), ("it", "is"), ("the shoes", "are"),
          ("the cookies", "are"), ("the windows", "are"), ("the keys", "are"), ("the lights", "are")]
PEOPLE_STATES = ["hungry", "tired", "happy", "ready", "at home", "in the garden", "late again", "still asleep",
                 "outside", "very busy", "upstairs", "in the kitchen", "at school", "on holiday", "very quiet", "sick"]
THING_STATES = ["open today", "too cold", "broken", "clean now", "on the table", "too loud", "very old", "ready",
                "too small", "in the car", "still wet", "very cheap", "closed", "new"]
ACTIONS = ["swim", "come tomorrow", "fix it", "wait here", "help us", "win the game", "see the sea", "read the map",
           "play outside", "stay for dinner", "sing well", "climb the hill", "find the keys", "finish early",
           "cook lunch", "drive to town", "call later", "carry the bag"]
PAST_ACTIONS = ["painted the fence", "washed the car", "visited the zoo", "cleaned the room", "opened the box",
                "planted a tree", "called the doctor", "watched a film", "baked a cake", "fixed the bike",
                "missed the bus", "found the ball", "crossed the river", "closed the gate"]

# ---------------------------------------------------------------------------------------------- facts

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
            ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Australia", "Canberra"),
            ("Canada", "Ottawa"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"),
            ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Russia", "Moscow"), ("Turkey", "Ankara"),
            ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
            ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
            ("Ireland", "Dublin"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Colombia", "Bogota"),
            ("Venezuela", "Caracas"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"),
            ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"),
            ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Morocco", "Rabat"), ("Ethiopia", "Addis Ababa"),
            ("Ghana", "Accra"), ("New Zealand", "Wellington"), ("Cuba", "Havana"), ("Belgium", "Brussels"),
            ("Romania", "Bucharest"), ("Ukraine", "Kyiv"), ("Iceland", "Reykjavik"), ("Uruguay", "Montevideo"),
            ("Ecuador", "Quito"), ("Croatia", "Zagreb"), ("Serbia", "Belgrade"), ("Bulgaria", "Sofia"),
            ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"), ("Lithuania", "Vilnius"), ("Latvia", "Riga"),
            ("Estonia", "Tallinn"), ("Jamaica", "Kingston"), ("Uganda", "Kampala"), ("Senegal", "Dakar"),
            ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Afghanistan", "Kabul"), ("Mongolia", "Ulaanbaatar"),
            ("Qatar", "Doha"), ("Jordan", "Amman"), ("Lebanon", "Beirut"), ("Syria", "Damascus"), ("Libya", "Tripoli"),
            ("Sudan", "Khartoum"), ("Zambia", "Lusaka"), ("Zimbabwe", "Harare"), ("Angola", "Luanda"),
            ("Bolivia", "Sucre"), ("Paraguay", "Asuncion"), ("Panama", "Panama City"), ("Malaysia", "Kuala Lumpur"),
            ("Indonesia", "Jakarta"), ("Cambodia", "Phnom Penh"), ("Laos", "Vientiane"), ("Georgia", "Tbilisi"),
            ("Armenia", "Yerevan"), ("Belarus", "Minsk"), ("Moldova", "Chisinau"), ("Albania", "Tirana"),
            ("Cyprus", "Nicosia"), ("Malta", "Valletta"), ("Switzerland", "Bern"), ("Netherlands", "Amsterdam")]
ANIMALS = {
    "mammal": """dog cat horse cow whale dolphin bat elephant lion tiger rabbit mouse bear giraffe kangaroo monkey sheep
goat pig fox wolf deer squirrel otter camel zebra hedgehog seal badger beaver mole hamster llama panda koala moose
rhino hippo leopard cheetah donkey""".split(),
    "bird": """eagle sparrow penguin ostrich owl parrot pigeon duck swan robin crow flamingo hawk chicken peacock
hummingbird seagull woodpecker goose emu falcon heron pelican stork vulture magpie finch canary raven wren""".split(),
    "fish": """salmon tuna trout shark goldfish cod carp herring sardine catfish mackerel perch eel swordfish halibut pike
anchovy seahorse haddock bass minnow guppy piranha stingray sturgeon tilapia barracuda""".split(),
}
ANTONYMS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("early", "late"), ("open", "closed"),
            ("full", "empty"), ("strong", "weak"), ("rich", "poor"), ("young", "old"), ("wet", "dry"), ("hard", "soft"),
            ("loud", "quiet"), ("buy", "sell"), ("push", "pull"), ("win", "lose"), ("love", "hate"),
            ("remember", "forget"), ("accept", "reject"), ("true", "false"), ("clean", "dirty"),
            ("cheap", "expensive"), ("thick", "thin"), ("wide", "narrow"), ("deep", "shallow"), ("safe", "dangerous"),
            ("polite", "rude"), ("ancient", "modern"), ("increase", "decrease"), ("include", "exclude"),
            ("maximum", "minimum"), ("victory", "defeat"), ("friend", "enemy"), ("question", "answer"),
            ("always", "never"), ("inside", "outside"), ("above", "below"), ("before", "after"), ("first", "last"),
            ("easy", "difficult"), ("sharp", "blunt"), ("smooth", "rough"), ("tight", "loose"), ("asleep", "awake"),
            ("give", "take"), ("float", "sink"), ("borrow", "lend"), ("shout", "whisper"), ("import", "export"),
            ("entrance", "exit"), ("day", "night"), ("north", "south"), ("east", "west"), ("success", "failure"),
            ("presence", "absence"), ("temporary", "permanent"), ("public", "private"), ("guilty", "innocent"),
            ("generous", "stingy"), ("up", "down"), ("light", "dark"), ("heavy", "light"), ("tall", "short"),
            ("arrive", "depart"), ("brave", "cowardly"), ("begin", "end"), ("laugh", "cry"), ("wild", "tame"),
            ("sweet", "sour"), ("noisy", "silent"), ("alive", "dead"), ("come", "go"), ("found", "lost")]

# ---------------------------------------------------------------------------------------------- rules


def plural(noun):
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def past_tense(verb):
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return verb + "ed"


def comparative(adjective):
    if adjective.endswith("e"):
        return adjective + "r"
    if adjective.endswith("y") and adjective[-2] not in "aeiou":
        return adjective[:-1] + "ier"
    return adjective + "er"


def with_commas(n):
    return f"{n:,}"


def sentence(subject, rest):
    return subject[0].upper() + subject[1:] + " " + rest + "."


def negative(aux):
    return "cannot" if aux == "can" else aux + " not"


def aux_sentences():
    """(statement, yes/no question, negative statement): the auxiliary moves to the front, or 'not' follows it."""
    triples = []
    for subjects, states in ((PEOPLE, PEOPLE_STATES), (THINGS, THING_STATES)):
        for (subject, be), state in ((p, s) for p in subjects for s in states):
            aux = be if len(state) % 2 else {"is": "was", "are": "were"}[be]  # present and past, deterministically mixed
            triples.append((subject, aux, state))
    for (subject, _), action in ((p, a) for p in PEOPLE for a in ACTIONS):
        triples.append((subject, ("can", "will", "should")[len(action) % 3], action))
    return [(sentence(s, f"{a} {r}"), f"{a.capitalize()} {s} {r}?", sentence(s, f"{negative(a)} {r}")) for s, a, r in triples]


# ---------------------------------------------------------------------------------------------- kinds
# Each kind: (family, items, make) where make(item, rng) -> (instruction, input, output, answer). Several phrasings
# per kind, some with the word in the instruction, some in the input field, so the prompt's shape varies.


def pick(rng, phrasings, **values):
    instruction, input_text = rng.choice(phrasings)
    return instruction.format(**values), input_text.format(**values)


def word_rule_kind(name, rule, words):
    phrasings = [(f'What is the {name} of "{{w}}"?', ""), (f"Give the {name} of the word {{w}}.", ""),
                 (f'Write the {name} form of "{{w}}".', ""), (f"What is the {name} of this word?", "{w}"),
                 (f"Write the {name} of the given word.", "{w}")]

    def make(w, rng):
        a = rule(w)
        return (*pick(rng, phrasings, w=w), f'The {name} of "{w}" is "{a}".', a)

    return "rule", words, make


def make_uppercase(w, rng):
    phrasings = [('Write "{w}" in capital letters.', ""), ("Write the word {w} in upper case.", ""),
                 ("Convert this word to capital letters.", "{w}"), ('How is "{w}" written in capitals?', "")]
    return (*pick(rng, phrasings, w=w), f'In capital letters, "{w}" is "{w.upper()}".', w.upper())


def make_parity(n, rng):
    phrasings = [("Is {n} an even or an odd number?", ""), ("Is {n} even or odd?", ""),
                 ("Tell whether the number is even or odd.", "{n}"), ("Even or odd: {n}?", "")]
    a = "even" if n % 2 == 0 else "odd"
    return (*pick(rng, phrasings, n=n), f"{n} is an {a} number.", a)


def make_next_number(n, rng):
    phrasings = [("What number comes after {n}?", ""), ("What is the next number after {n}?", ""),
                 ("Which number follows {n}?", ""), ("Give the number that comes right after this one.", "{n}")]
    return (*pick(rng, phrasings, n=n), f"The number after {n} is {n + 1}.", str(n + 1))


def make_larger(pair, rng):
    a, b = pair
    phrasings = [("Which number is larger, {a} or {b}?", ""), ("Which is bigger: {a} or {b}?", ""),
                 ("Pick the larger of the two numbers.", "{a} and {b}"), ("What is the larger number, {a} or {b}?", "")]
    return (*pick(rng, phrasings, a=a, b=b), f"The larger number is {max(a, b)}.", str(max(a, b)))


def make_commas(n, rng):
    phrasings = [("Write {n} with commas between the thousands.", ""), ("Add thousands separators to {n}.", ""),
                 ("Format this number with commas.", "{n}"), ("How is {n} written with commas?", "")]
    return (*pick(rng, phrasings, n=n), f"{n} is written {with_commas(n)}.", with_commas(n))


def make_question(triple, rng):
    statement, question, _ = triple
    phrasings = [("Turn this statement into a yes/no question.", "{s}"), ("Rewrite the sentence as a question.", "{s}"),
                 ("Make a question from this sentence.", "{s}")]
    return (*pick(rng, phrasings, s=statement), question, question)


def make_negation(triple, rng):
    statement, _, negative = triple
    phrasings = [("Make this sentence negative.", "{s}"), ("Rewrite the sentence with \"not\".", "{s}"),
                 ("Write the negative form of this sentence.", "{s}")]
    return (*pick(rng, phrasings, s=statement), negative, negative)


def make_last_word(text, rng):
    phrasings = [("What is the last word of this sentence?", "{s}"), ("Which word ends the sentence?", "{s}"),
                 ("Name the final word of the sentence.", "{s}")]
    last = text.rstrip(".").split()[-1]
    return (*pick(rng, phrasings, s=text), f'The last word is "{last}".', last)


def make_capital(fact, rng):
    country, city = fact
    phrasings = [("What is the capital of {c}?", ""), ("Name the capital city of {c}.", ""),
                 ("Which city is the capital of {c}?", ""), ("What is the capital of this country?", "{c}")]
    return (*pick(rng, phrasings, c=country), f"The capital of {country} is {city}.", city)


def make_animal_class(fact, rng):
    animal, group = fact
    article = "an" if animal[0] in "aeiou" else "a"
    phrasings = [("Is {a} {x} a mammal, a bird, or a fish?", ""), ("Which group does the {x} belong to: mammal, bird or fish?", ""),
                 ("Classify the animal as a mammal, a bird, or a fish.", "{x}")]
    return (*pick(rng, phrasings, a=article, x=animal), f"{article.capitalize()} {animal} is a {group}.", group)


def make_antonym(pair, rng):
    w, a = pair
    phrasings = [('What is the opposite of "{w}"?', ""), ("Give an antonym of {w}.", ""),
                 ("Find the antonym of the given word.", "{w}"), ('Name a word that means the opposite of "{w}".', "")]
    return (*pick(rng, phrasings, w=w), f'The opposite of "{w}" is "{a}".', a)


def kinds(rng):
    """kind name -> (family, items, make). Items are distinct within a kind, so a test item is never trained on."""
    numbers = rng.sample(range(10, 10000), 600)
    pairs = list({tuple(sorted(rng.sample(range(10, 1000), 2))): None for _ in range(600)})
    pairs = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pairs]
    sentences = aux_sentences()
    statements = [sentence(subject, action) for subject, _ in PEOPLE for action in PAST_ACTIONS]
    return {
        "plural": word_rule_kind("plural", plural, NOUNS + NOUNS_ES + NOUNS_Y + NOUNS_VOWEL_Y),
        "past_tense": word_rule_kind("past tense", past_tense, VERBS + VERBS_E + VERBS_Y),
        "comparative": word_rule_kind("comparative", comparative, ADJECTIVES + ADJECTIVES_E + ADJECTIVES_Y),
        "uppercase": ("rule", CAPS_WORDS, make_uppercase),
        "parity": ("rule", numbers[:300], make_parity),
        "next_number": ("rule", rng.sample(range(1, 1000), 200), make_next_number),
        "larger": ("rule", pairs, make_larger),
        "commas": ("rule", rng.sample(range(1000, 10_000_000), 300), make_commas),
        "question": ("rule", sentences[::2], make_question),  # one sentence is never both a question and a negation item
        "negation": ("rule", sentences[1::2], make_negation),
        "last_word": ("rule", statements, make_last_word),
        "capital": ("fact", CAPITALS, make_capital),
        "animal_class": ("fact", [(a, g) for g, names in ANIMALS.items() for a in names], make_animal_class),
        "antonym": ("fact", ANTONYMS, make_antonym),
    }


def item_key(item):
    """The identity of an item for the split rule: a word, a number, a country, an animal, a sentence."""
    if isinstance(item, tuple) and all(isinstance(x, int) for x in item):
        return " or ".join(map(str, item))  # a pair of numbers to compare
    return str(item[0] if isinstance(item, tuple) else item)


def build_examples(seed=SEED, per_kind=200):
    """Train + validation + test examples in file order (see the module docstring for the split rule)."""
    rng = random.Random(seed)
    held_out, trainval = [], []
    for kind, (family, items, make) in kinds(rng).items():
        items = list(dict.fromkeys(items))  # a word listed twice is one item
        rng.shuffle(items)
        test_items, train_items = items[:TEST_ITEMS_PER_KIND], items[TEST_ITEMS_PER_KIND:per_kind]
        for part, chosen in ((held_out, test_items), (trainval, train_items)):
            for item in chosen:
                instruction, input_text, output, answer = make(item, rng)
                part.append({"instruction": instruction, "input": input_text, "output": output,
                             "kind": kind, "answer": answer, "item": item_key(item)})
    rng.shuffle(held_out)
    rng.shuffle(trainval)
    # grow or shrink the train+validation part until the file-order split puts exactly the held-out items last
    n = len(held_out) + len(trainval)
    while n - int(TRAIN_FRAC * n) - int(VAL_FRAC * n) != len(held_out):
        trainval.pop()
        n -= 1
    return trainval + held_out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output directory")
    args = parser.parse_args()
    examples = build_examples()
    path = os.path.join(args.out, FILENAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(examples, f, indent=2, ensure_ascii=False)
        f.write("\n")
    counts = Counter(ex["kind"] for ex in examples)
    print(f"wrote {len(examples)} examples to {path}")
    for kind, count in counts.items():
        print(f"  {kind:14s} {count}")


if __name__ == "__main__":
    main()
