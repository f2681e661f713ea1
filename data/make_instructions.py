"""Generate data/instructions.json: the offline instruction-tuning set, in Alpaca format plus four keys.

    {"instruction": "...", "input": "...", "output": "...",     # Alpaca's three (input may be "")
     "kind": "plural", "answer": "boxes", "item": "box",         # what the scorer and the split rule use
     "phrasing": "trained"}                                      # or "held_out": a phrasing training never shows

`answer` is the key answer that a correct response contains (scored by answers.contains_answer); `item` is the
word, number, list, sentence or fact the question is about. Loaders read only Alpaca's three keys and ignore the rest.

Two families of kinds, because they answer different questions about fine-tuning:
- RULE kinds: the answer follows from the prompt by a rule the examples show (word forms, letters, numbers,
  orderings, counts, sentence transformations). A model can learn the rule and apply it to items it never saw.
- FACT kinds: the answer is a fact about the world (capitals, animal classes, antonyms). Nothing in the prompt
  gives it away; a model that never saw the fact can only guess.

Phrasings are composed, not listed: each kind names its task in a dozen or more ASKS (a noun phrase such as "the
plural of {q}", a command such as "put {q} in the plural", or a whole question), with the item in the instruction
or in the input field, and every ask goes into every FRAME of its style, shared by all kinds (a question, an
imperative, a polite or a terse request). Each example then varies the surface: the word quoted ("box", 'box') or
bare, the first letter lower case, the final mark left off. A kind has 130 to 360 phrasings.

Two splits, both written into the file:
- Phrasings: a quarter of each kind's asks and a quarter of each style's frames are held out for that kind; a
  phrasing that uses either is never trained on (nor validated on). It appears only in the test split, tagged
  "phrasing": "held_out", so a run can report how well a rule carries over to words it was never asked in.
- Items: the file is written as train, validation, test (85% / 5% / 10%, the split train.py makes in file order),
  and every test item is new: no test item of a kind occurs in the train or validation part of that kind. Each kind
  has TEST_ITEMS_PER_KIND test items in trained phrasings and as many in held-out phrasings.

Deterministic (its own seeded random.Random): running it again gives a byte-identical file.

    python data/make_instructions.py            # writes data/instructions.json
    python data/make_instructions.py --out DIR  # writes DIR/instructions.json
    python data/make_instructions.py --seed 7 --kinds all --out DIR   # other items and splits; the candidate kinds too
    python data/make_instructions.py --free_sentences --out DIR   # the sentence kinds on free sentences

Written for nanoQLoRA; covered by the project's licence. All word lists, facts and phrasings are typed in this file.
"""

import argparse
import json
import os
import random
from collections import Counter

SEED = 1234
FILENAME = "instructions.json"
TEST_ITEMS_PER_KIND = 10  # per kind: 10 test items asked in trained phrasings, 10 more in held-out phrasings
TRAIN_ITEMS_PER_KIND = 220  # at most; kinds with fewer items (the facts) have fewer
HELD_OUT_FRACTION = 4  # one in HELD_OUT_FRACTION of a kind's asks, and of its frames of each style, is held out
TRAIN_FRAC, VAL_FRAC = 0.85, 0.05  # the split train.py makes (instruction_files.split_examples)

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
NOUNS_VOWEL_Y = (
    "day key toy boy valley monkey tray play guy ray donkey jockey turkey chimney alley journey highway".split()
)

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
VERBS_Y = (
    "cry try study carry hurry worry marry copy reply bury apply deny dry fry tidy spy envy pity rely supply".split()
)

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
PEOPLE = [
    ("my brother", "is"),
    ("the teacher", "is"),
    ("your sister", "is"),
    ("the baby", "is"),
    ("our neighbor", "is"),
    ("the doctor", "is"),
    ("my friend", "is"),
    ("the dog", "is"),
    ("he", "is"),
    ("she", "is"),
    ("the kids", "are"),
    ("my parents", "are"),
    ("our friends", "are"),
    ("the students", "are"),
    ("the players", "are"),
    ("they", "are"),
    ("we", "are"),
    ("the twins", "are"),
]
THINGS = [
    ("the shop", "is"),
    ("the soup", "is"),
    ("the train", "is"),
    ("the garden", "is"),
    ("my phone", "is"),
    ("the door", "is"),
    ("the room", "is"),
    ("the road", "is"),
    ("it", "is"),
    ("the shoes", "are"),
    ("the cookies", "are"),
    ("the windows", "are"),
    ("the keys", "are"),
    ("the lights", "are"),
]
PEOPLE_STATES = [
    "hungry",
    "tired",
    "happy",
    "ready",
    "at home",
    "in the garden",
    "late again",
    "still asleep",
    "outside",
    "very busy",
    "upstairs",
    "in the kitchen",
    "at school",
    "on holiday",
    "very quiet",
    "sick",
]
THING_STATES = [
    "open today",
    "too cold",
    "broken",
    "clean now",
    "on the table",
    "too loud",
    "very old",
    "ready",
    "too small",
    "in the car",
    "still wet",
    "very cheap",
    "closed",
    "new",
]
ACTIONS = [
    "swim",
    "come tomorrow",
    "fix it",
    "wait here",
    "help us",
    "win the game",
    "see the sea",
    "read the map",
    "play outside",
    "stay for dinner",
    "sing well",
    "climb the hill",
    "find the keys",
    "finish early",
    "cook lunch",
    "drive to town",
    "call later",
    "carry the bag",
]
PAST_ACTIONS = [
    "painted the fence",
    "washed the car",
    "visited the zoo",
    "cleaned the room",
    "opened the box",
    "planted a tree",
    "called the doctor",
    "watched a film",
    "baked a cake",
    "fixed the bike",
    "missed the bus",
    "found the ball",
    "crossed the river",
    "closed the gate",
]

# FREE SENTENCES (--free_sentences, not in the committed file) for the kinds that read a sentence: first and last word,
# word count, sentence type. The sentences built from PEOPLE and PAST_ACTIONS end in one of 14 words and have four or
# five words, so a model can answer "the last word" or "the word count" from a short list without reading the
# sentence. These vary the first word, the last word, the length (2 to 9 words) and the shape: subject, verb, then an
# object and a place, either or neither; questions with "did" and a wh-word, exclamations with "What a" and "How".
NAMES = "Anna Tom Maria Sam Lucy Ben Emma Jack Nora Leo Mia Omar Zoe Raj Ivy Max Ruth Hugo Lena Carl".split()
MANY = {"mouse": "mice", "sheep": "sheep", "man": "men", "woman": "women", "child": "children", "fox": "foxes"}
CREATURES = """dog cat horse bird goat fox duck owl bear mouse cow sheep frog girl boy man woman child farmer
pilot""".split()
# (base, past) of the verbs: the past tense makes statements, the base form questions ("Did the fox jump?")
INTRANSITIVE = [
    ("sleep", "slept"),
    ("laugh", "laughed"),
    ("wait", "waited"),
    ("smile", "smiled"),
    ("arrive", "arrived"),
    ("dance", "danced"),
    ("rest", "rested"),
    ("sing", "sang"),
    ("run", "ran"),
    ("jump", "jumped"),
    ("walk", "walked"),
    ("play", "played"),
    ("shout", "shouted"),
    ("stay", "stayed"),
    ("sit", "sat"),
    ("swim", "swam"),
    ("hide", "hid"),
    ("work", "worked"),
]
TRANSITIVE = [
    ("find", "found"),
    ("see", "saw"),
    ("paint", "painted"),
    ("wash", "washed"),
    ("carry", "carried"),
    ("open", "opened"),
    ("clean", "cleaned"),
    ("fix", "fixed"),
    ("watch", "watched"),
    ("buy", "bought"),
    ("drop", "dropped"),
    ("push", "pushed"),
    ("build", "built"),
    ("move", "moved"),
    ("lose", "lost"),
    ("sell", "sold"),
    ("make", "made"),
    ("hold", "held"),
    ("park", "parked"),
    ("read", "read"),
]
PLACES = ["in", "on", "near", "under", "behind", "by", "beside", "across", "over", "into", "at"]
DETERMINERS = ["the", "a", "my", "our", "her", "his", "that", "their"]
COLOURS = "red blue green white black brown grey pink".split()
WH_WORDS = ["Where", "Why", "When", "How"]


def noun_phrase(rng, nouns, max_words):
    """'the box', 'a small box', 'my old red box', up to max_words words (at least 2)."""
    det, noun = rng.choice(DETERMINERS), rng.choice([n for n in nouns if n not in PROBE_ITEMS])
    extra = [w for w in (rng.choice(ADJECTIVES), rng.choice(COLOURS)) if rng.random() < 0.35][: max_words - 2]
    words = [det] + extra + [noun]
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def free_clause(rng):
    """-> (subject, verb (base, past), rest): the parts of one sentence of 2 to 9 words, lower case."""
    r = rng.random()
    subject = (
        rng.choice(NAMES)
        if r < 0.3
        else rng.choice(["we", "they", "you", "she", "he", "I"])
        if r < 0.45
        else MANY.get(noun := rng.choice(CREATURES), noun + "s")
        if r < 0.55
        else noun_phrase(rng, CREATURES, 3)
    )
    transitive = rng.random() < 0.6
    verb = rng.choice(TRANSITIVE if transitive else INTRANSITIVE)
    rest = []
    if transitive:
        rest.append(noun_phrase(rng, NOUNS, 4))
    if not transitive or rng.random() < 0.4:
        if rng.random() < 0.8:
            rest.append(rng.choice(PLACES) + " " + noun_phrase(rng, NOUNS, 3))
    clause = (subject, verb, " ".join(rest))
    length = len(subject.split()) + 1 + len(clause[2].split())
    return clause if length <= 9 else free_clause(rng)


def capitalized(text):
    return text[:1].upper() + text[1:]


def free_statements(rng, count):
    """`count` distinct statements: 'Anna found a blue cup under the bench.', 'The dogs slept.'"""
    out = {}
    while len(out) < count:
        subject, (_, past), rest = free_clause(rng)
        out[capitalized(" ".join(filter(None, (subject, past, rest)))) + "."] = None
    return list(out)


def free_typed_sentences(rng, count):
    """`count` distinct sentences, a third each statements, questions and exclamations, of several shapes each:
    'Did the fox hide behind our shed?', 'Where did Tom park the car?', 'What a strange lamp this is!'"""
    out = {}
    while len(out) < count:
        subject, (base, past), rest = free_clause(rng)
        shape = len(out) % 3
        if shape == 0:
            text = capitalized(" ".join(filter(None, (subject, past, rest)))) + "."
        elif shape == 1:
            wh = rng.choice(["Did"] + WH_WORDS)
            did = "did" if wh != "Did" else ""
            # the subject as it stands: lower case, but for names and "I"
            text = " ".join(filter(None, (wh, did, subject, base, rest))) + "?"
        else:
            adjective, noun = rng.choice(ADJECTIVES), rng.choice([n for n in NOUNS if n not in PROBE_ITEMS])
            text = rng.choice(
                [
                    f"What {article(adjective)} {adjective} {noun} this is!",
                    f"How {adjective} the {noun} is!",
                    capitalized(" ".join(filter(None, (subject, past, rest)))) + "!",
                ]
            )
        out[text] = None
    return list(out)


# ---------------------------------------------------------------------------------------------- facts

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Australia", "Canberra"),
    ("Canada", "Ottawa"),
    ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"),
    ("Russia", "Moscow"),
    ("Turkey", "Ankara"),
    ("Greece", "Athens"),
    ("Sweden", "Stockholm"),
    ("Norway", "Oslo"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Hungary", "Budapest"),
    ("Ireland", "Dublin"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"),
    ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"),
    ("Nepal", "Kathmandu"),
    ("Morocco", "Rabat"),
    ("Ethiopia", "Addis Ababa"),
    ("Ghana", "Accra"),
    ("New Zealand", "Wellington"),
    ("Cuba", "Havana"),
    ("Belgium", "Brussels"),
    ("Romania", "Bucharest"),
    ("Ukraine", "Kyiv"),
    ("Iceland", "Reykjavik"),
    ("Uruguay", "Montevideo"),
    ("Ecuador", "Quito"),
    ("Croatia", "Zagreb"),
    ("Serbia", "Belgrade"),
    ("Bulgaria", "Sofia"),
    ("Slovakia", "Bratislava"),
    ("Slovenia", "Ljubljana"),
    ("Lithuania", "Vilnius"),
    ("Latvia", "Riga"),
    ("Estonia", "Tallinn"),
    ("Jamaica", "Kingston"),
    ("Uganda", "Kampala"),
    ("Senegal", "Dakar"),
    ("Algeria", "Algiers"),
    ("Tunisia", "Tunis"),
    ("Afghanistan", "Kabul"),
    ("Mongolia", "Ulaanbaatar"),
    ("Qatar", "Doha"),
    ("Jordan", "Amman"),
    ("Lebanon", "Beirut"),
    ("Syria", "Damascus"),
    ("Libya", "Tripoli"),
    ("Sudan", "Khartoum"),
    ("Zambia", "Lusaka"),
    ("Zimbabwe", "Harare"),
    ("Angola", "Luanda"),
    ("Bolivia", "Sucre"),
    ("Paraguay", "Asuncion"),
    ("Panama", "Panama City"),
    ("Malaysia", "Kuala Lumpur"),
    ("Indonesia", "Jakarta"),
    ("Cambodia", "Phnom Penh"),
    ("Laos", "Vientiane"),
    ("Georgia", "Tbilisi"),
    ("Armenia", "Yerevan"),
    ("Belarus", "Minsk"),
    ("Moldova", "Chisinau"),
    ("Albania", "Tirana"),
    ("Cyprus", "Nicosia"),
    ("Malta", "Valletta"),
    ("Switzerland", "Bern"),
    ("Netherlands", "Amsterdam"),
]
ANIMALS = {
    "mammal": """dog cat horse cow whale dolphin bat elephant lion tiger rabbit mouse bear giraffe kangaroo monkey sheep
goat pig fox wolf deer squirrel otter camel zebra hedgehog seal badger beaver mole hamster llama panda koala moose
rhino hippo leopard cheetah donkey""".split(),
    "bird": """eagle sparrow penguin ostrich owl parrot pigeon duck swan robin crow flamingo hawk chicken peacock
hummingbird seagull woodpecker goose emu falcon heron pelican stork vulture magpie finch canary raven wren""".split(),
    "fish": """salmon tuna trout shark goldfish cod carp herring sardine catfish mackerel perch eel swordfish halibut pike
anchovy seahorse haddock bass minnow guppy piranha stingray sturgeon tilapia barracuda""".split(),
}
ANTONYMS = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("early", "late"),
    ("open", "closed"),
    ("full", "empty"),
    ("strong", "weak"),
    ("rich", "poor"),
    ("young", "old"),
    ("wet", "dry"),
    ("hard", "soft"),
    ("loud", "quiet"),
    ("buy", "sell"),
    ("push", "pull"),
    ("win", "lose"),
    ("love", "hate"),
    ("remember", "forget"),
    ("accept", "reject"),
    ("true", "false"),
    ("clean", "dirty"),
    ("cheap", "expensive"),
    ("thick", "thin"),
    ("wide", "narrow"),
    ("deep", "shallow"),
    ("safe", "dangerous"),
    ("polite", "rude"),
    ("ancient", "modern"),
    ("increase", "decrease"),
    ("include", "exclude"),
    ("maximum", "minimum"),
    ("victory", "defeat"),
    ("friend", "enemy"),
    ("question", "answer"),
    ("always", "never"),
    ("inside", "outside"),
    ("above", "below"),
    ("before", "after"),
    ("first", "last"),
    ("easy", "difficult"),
    ("sharp", "blunt"),
    ("smooth", "rough"),
    ("tight", "loose"),
    ("asleep", "awake"),
    ("give", "take"),
    ("float", "sink"),
    ("borrow", "lend"),
    ("shout", "whisper"),
    ("import", "export"),
    ("entrance", "exit"),
    ("day", "night"),
    ("north", "south"),
    ("east", "west"),
    ("success", "failure"),
    ("presence", "absence"),
    ("temporary", "permanent"),
    ("public", "private"),
    ("guilty", "innocent"),
    ("generous", "stingy"),
    ("up", "down"),
    ("light", "dark"),
    ("heavy", "light"),
    ("tall", "short"),
    ("arrive", "depart"),
    ("brave", "cowardly"),
    ("begin", "end"),
    ("laugh", "cry"),
    ("wild", "tame"),
    ("sweet", "sour"),
    ("noisy", "silent"),
    ("alive", "dead"),
    ("come", "go"),
    ("found", "lost"),
]

# The items data/new_questions.json asks about (written by hand, apart from this file, to try a trained model on
# questions it has never seen in any form): no kind uses them.
PROBE_ITEMS = {
    "lamp",
    "blanket",
    "pillow",
    "yell",
    "stitch",
    "keen",
    "crisp",
    "7359",
    "412",
    "the cat slept on the mat.",
    "we walked to the old bridge.",
    "the baby is asleep.",
    "the cat is hungry.",
    "pebble",
    "walnut",
    "58",
    "312 or 87",
    "5820113",
    "fiji",
    "walrus",
    "empty",
    "parcels",
    "puddles",
    "umbrella",
    "velvet",
    "640 or 215",
    "77 or 903",
    "birds sang in the tall trees.",
    "the red kite flew over the farm.",
    "what a lovely garden this is!",
    "where did you park the car?",
}

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
            aux = (
                be if len(state) % 2 else {"is": "was", "are": "were"}[be]
            )  # present and past, deterministically mixed
            triples.append((subject, aux, state))
    for (subject, _), action in ((p, a) for p in PEOPLE for a in ACTIONS):
        triples.append((subject, ("can", "will", "should")[len(action) % 3], action))
    return [
        (sentence(s, f"{a} {r}"), f"{a.capitalize()} {s} {r}?", sentence(s, f"{negative(a)} {r}"))
        for s, a, r in triples
    ]


def superlative(adjective):
    if adjective.endswith("e"):
        return adjective + "st"
    if adjective.endswith("y") and adjective[-2] not in "aeiou":
        return adjective[:-1] + "iest"
    return adjective + "est"


def sentence_type(text):
    return {".": "statement", "?": "question", "!": "exclamation"}[text[-1]]


# ---------------------------------------------------------------------------------------------- phrasings
# A phrasing is a template (instruction, input). It is an ASK of one kind put into a FRAME of the ask's style:
#   "np"  the ask is a noun phrase:   "the plural of {q}"        -> "Could you tell me the plural of {q}?"
#   "cmd" the ask is a command:       "put {q} in the plural"    -> "Please put {q} in the plural."
#   "q"   the ask is a whole question: "is {v} even or odd?"     -> "Quick question: is {v} even or odd?"
# An ask with a slot carries the item in the instruction ({q}: quoted or bare; {v}: bare; {a}, {b}: two numbers); an
# ask without one ("the plural of this noun") gets the item in the input field.

FRAMES = {
    "np": [
        "What is {x}?",
        "What's {x}?",
        "Tell me {x}.",
        "Give {x}.",
        "Give me {x}.",
        "Write {x}.",
        "Find {x}.",
        "Provide {x}.",
        "State {x}.",
        "Please give {x}.",
        "Please tell me {x}.",
        "Could you tell me {x}?",
        "Can you give me {x}?",
        "Would you write {x}, please?",
        "I need {x}.",
        "I'd like {x}, please.",
        "Do you know {x}?",
        "{x}?",
        "{x}, please.",
        "Quick question: what is {x}?",
        "Help me find {x}.",
        "Kindly provide {x}.",
        "Name {x}.",
        "Show me {x}.",
    ],
    "cmd": [
        "{x}.",
        "Please {x}.",
        "Can you {x}?",
        "Could you {x}, please?",
        "{x}, please.",
        "I need you to {x}.",
        "Kindly {x}.",
        "Your task: {x}.",
        "Now {x}.",
        "Would you {x}?",
        "Help me {x}.",
        "{x}!",
        "Task: {x}.",
        "Go ahead and {x}.",
        "I want you to {x}.",
        "Try to {x}.",
    ],
    "q": [
        "{x}",
        "Tell me: {x}",
        "Quick question: {x}",
        "Please answer: {x}",
        "Question: {x}",
        "I wonder, {x}",
        "Can you answer this? {x}",
        "Answer this: {x}",
        "{x} Thanks!",
        "Hey, {x}",
        "{x} Answer briefly.",
        "Here's one: {x}",
    ],
}


def word_form_asks(name, pos, extra=()):
    """Asks for a word-form kind ('plural' of a 'noun', 'past tense' of a 'verb', ...)."""
    return [
        ("np", f"the {name} of {{q}}"),
        ("np", f"the {name} form of {{q}}"),
        ("np", f"the {name} of the {pos} {{q}}"),
        ("np", f"the {name} of this {pos}"),
        ("np", f"the {name} form of the word below"),
        ("np", f"the {name} of the given word"),
        ("cmd", f"write the {name} of {{q}}"),
        ("cmd", f"give the {name} form of {{q}}"),
        ("cmd", f"put {{q}} in the {name}"),
        ("cmd", f"change the {pos} {{q}} to the {name}"),
        ("cmd", f"convert this word to its {name} form"),
        ("cmd", f"turn the following {pos} into the {name}"),
        ("cmd", f"form the {name} of this word"),
        ("q", f"what is the {name} of {{q}}?"),
        ("q", f"how do you write {{q}} in the {name}?"),
        ("q", f"what is the {name} form of this {pos}?"),
        ("q", f"which word is the {name} of {{q}}?"),
        ("q", f"do you know the {name} of the word below?"),
        *extra,
    ]


ASKS = {
    "plural": word_form_asks(
        "plural",
        "noun",
        [
            ("cmd", "make {q} plural"),
            ("cmd", "pluralize the following noun"),
            ("q", "what do you call more than one {q}?"),
            ("q", "one {q}, two what?"),
        ],
    ),
    "singular": word_form_asks(
        "singular",
        "noun",
        [("cmd", "make {q} singular"), ("q", "what is just one of {q} called?"), ("np", "the word for one of {q}")],
    ),
    "past_tense": word_form_asks(
        "past tense",
        "verb",
        [
            ("np", "the simple past of {q}"),
            ("q", "how does {q} look in the past tense?"),
            ("cmd", "conjugate {q} in the simple past"),
        ],
    ),
    "comparative": word_form_asks(
        "comparative", "adjective", [("np", "the comparative degree of {q}"), ("q", 'which word means "more {v}"?')]
    ),
    "superlative": word_form_asks(
        "superlative", "adjective", [("np", "the superlative degree of {q}"), ("q", 'which word means "the most {v}"?')]
    ),
    "uppercase": [
        ("np", "{q} in capital letters"),
        ("np", "{q} in upper case"),
        ("np", "the uppercase form of {q}"),
        ("np", "this word in capitals"),
        ("np", "the given word in block letters"),
        ("cmd", "write {q} in capital letters"),
        ("cmd", "capitalize every letter of {q}"),
        ("cmd", "convert {q} to uppercase"),
        ("cmd", "put this word in all caps"),
        ("cmd", "change the following word to upper case"),
        ("cmd", "spell {q} in capitals"),
        ("q", "how is {q} written in capitals?"),
        ("q", "what does {q} look like in upper case?"),
        ("q", "how do you write this word in all capital letters?"),
    ],
    "first_letter": [
        ("np", "the first letter of {q}"),
        ("np", "the letter {q} starts with"),
        ("np", "the initial letter of this word"),
        ("np", "the first letter of the word below"),
        ("cmd", "give the first letter of {q}"),
        ("cmd", "name the letter at the start of this word"),
        ("cmd", "find the first letter of the following word"),
        ("cmd", "write down the letter {q} begins with"),
        ("q", "what letter does {q} begin with?"),
        ("q", "which letter starts the word {q}?"),
        ("q", "what is the first letter of this word?"),
        ("q", "with which letter does this word start?"),
    ],
    "parity": [
        ("np", "the parity of {v}"),
        ("np", "whether {v} is even or odd"),
        ("np", "the parity of this number"),
        ("cmd", "tell me if {v} is odd or even"),
        ("cmd", "decide whether this number is even or odd"),
        ("cmd", "classify {v} as even or odd"),
        ("cmd", "label the following number as odd or even"),
        ("q", "is {v} even or odd?"),
        ("q", "is {v} an even or an odd number?"),
        ("q", "is the number {v} odd or even?"),
        ("q", "even or odd: {v}?"),
        ("q", "is this number even or odd?"),
        ("q", "odd or even, this number?"),
    ],
    "next_number": [
        ("np", "the number after {v}"),
        ("np", "the next number after {v}"),
        ("np", "the successor of {v}"),
        ("np", "the number that comes after this one"),
        ("cmd", "count one up from {v}"),
        ("cmd", "add one to {v}"),
        ("cmd", "give the number that follows this one"),
        ("cmd", "write the number after {v}"),
        ("q", "what number comes after {v}?"),
        ("q", "what is the next number after {v}?"),
        ("q", "which number follows {v}?"),
        ("q", "what comes right after {v} when counting?"),
        ("q", "what number is one more than {v}?"),
        ("q", "what number comes next after this one?"),
    ],
    "larger": [
        ("np", "the larger of {a} and {b}"),
        ("np", "the bigger number of {a} and {b}"),
        ("np", "the maximum of {a} and {b}"),
        ("np", "the larger of these two numbers"),
        ("cmd", "pick the larger of {a} and {b}"),
        ("cmd", "choose the bigger number: {a} or {b}"),
        ("cmd", "compare {a} and {b} and name the larger one"),
        ("cmd", "pick the greater of the two numbers"),
        ("q", "which number is larger, {a} or {b}?"),
        ("q", "which is bigger: {a} or {b}?"),
        ("q", "which is greater, {a} or {b}?"),
        ("q", "of {a} and {b}, which is larger?"),
        ("q", "which of these two numbers is larger?"),
    ],
    "smaller": [
        ("np", "the smaller of {a} and {b}"),
        ("np", "the lesser number of {a} and {b}"),
        ("np", "the minimum of {a} and {b}"),
        ("np", "the smaller of these two numbers"),
        ("cmd", "pick the smaller of {a} and {b}"),
        ("cmd", "choose the lower number: {a} or {b}"),
        ("cmd", "compare {a} and {b} and name the smaller one"),
        ("cmd", "pick the lesser of the two numbers"),
        ("q", "which number is smaller, {a} or {b}?"),
        ("q", "which is less: {a} or {b}?"),
        ("q", "which is lower, {a} or {b}?"),
        ("q", "of {a} and {b}, which is smaller?"),
        ("q", "which of these two numbers is smaller?"),
    ],
    "commas": [
        ("np", "{v} with commas"),
        ("np", "{v} with thousands separators"),
        ("np", "this number with commas"),
        ("cmd", "write {v} with commas between the thousands"),
        ("cmd", "add commas to {v}"),
        ("cmd", "add thousands separators to {v}"),
        ("cmd", "put commas in this number"),
        ("cmd", "format the following number with thousands separators"),
        ("cmd", "group the digits of {v} with commas"),
        ("q", "how is {v} written with commas?"),
        ("q", "how do you write {v} with thousands separators?"),
        ("q", "where do the commas go in this number?"),
        ("q", "what does {v} look like with commas?"),
    ],
    "sort_words": [
        ("np", "these words in alphabetical order"),
        ("np", "the alphabetical order of {v}"),
        ("np", "the words {v} sorted from A to Z"),
        ("cmd", "sort these words alphabetically"),
        ("cmd", "put the following words in alphabetical order"),
        ("cmd", "arrange {v} in alphabetical order"),
        ("cmd", "sort the words {v} from A to Z"),
        ("cmd", "alphabetize this list"),
        ("q", "what is the alphabetical order of these words?"),
        ("q", "in alphabetical order, how do {v} go?"),
        ("q", "how would these words be ordered in a dictionary?"),
    ],
    "sort_numbers": [
        ("np", "these numbers in ascending order"),
        ("np", "the numbers {v} in increasing order"),
        ("np", "this list sorted from smallest to largest"),
        ("cmd", "sort these numbers from smallest to largest"),
        ("cmd", "arrange {v} in ascending order"),
        ("cmd", "put the following numbers in increasing order"),
        ("cmd", "order the numbers {v} from low to high"),
        ("cmd", "sort this list in ascending order"),
        ("q", "what are these numbers in ascending order?"),
        ("q", "how do {v} go from smallest to largest?"),
        ("q", "in what order do these numbers go, smallest first?"),
    ],
    "reverse_words": [
        ("np", "these words in reverse order"),
        ("np", "the words {v} in reverse order"),
        ("np", "this list reversed"),
        ("cmd", "reverse the order of these words"),
        ("cmd", "write the words {v} in reverse order"),
        ("cmd", "list the following words backwards"),
        ("cmd", "turn this list around"),
        ("cmd", "reverse the list {v}"),
        ("q", "what are these words in reverse order?"),
        ("q", "how does {v} read backwards, word by word?"),
        ("q", "what is this list with the last word first?"),
    ],
    "question": [
        ("np", "the question form of {q}"),
        ("np", "the yes/no question for this statement"),
        ("np", "this sentence as a question"),
        ("cmd", "turn this statement into a yes/no question"),
        ("cmd", "rewrite the sentence as a question"),
        ("cmd", "make a question out of this sentence"),
        ("cmd", "change the following statement into a question"),
        ("cmd", "turn {q} into a question"),
        ("cmd", "rewrite {q} as a yes-no question"),
        ("q", "how would you ask this as a question?"),
        ("q", "what is the yes/no question for {q}?"),
        ("q", "how does this statement go as a question?"),
    ],
    "negation": [
        ("np", "the negative form of {q}"),
        ("np", "the negation of this sentence"),
        ("np", "this statement in the negative"),
        ("cmd", "make this sentence negative"),
        ("cmd", 'rewrite the sentence with "not"'),
        ("cmd", "negate {q}"),
        ("cmd", "turn the following sentence into a negative one"),
        ("cmd", "put this statement in the negative"),
        ("cmd", "make {q} negative"),
        ("q", 'how do you say this with "not"?'),
        ("q", "what is the negative of {q}?"),
        ("q", "what is the negative version of this sentence?"),
    ],
    "last_word": [
        ("np", "the last word of {q}"),
        ("np", "the final word of this sentence"),
        ("np", "the word this sentence ends with"),
        ("cmd", "name the final word of the sentence"),
        ("cmd", "give the last word of {q}"),
        ("cmd", "find the word that ends this sentence"),
        ("cmd", "copy out the last word"),
        ("q", "what is the last word of this sentence?"),
        ("q", "which word ends the sentence?"),
        ("q", "what is the final word in {q}?"),
        ("q", "which word is at the end of {q}?"),
    ],
    "first_word": [
        ("np", "the first word of {q}"),
        ("np", "the opening word of this sentence"),
        ("np", "the word this sentence starts with"),
        ("cmd", "name the first word of the sentence"),
        ("cmd", "give the first word of {q}"),
        ("cmd", "find the word that begins this sentence"),
        ("cmd", "copy out the first word"),
        ("q", "what is the first word of this sentence?"),
        ("q", "which word starts the sentence?"),
        ("q", "what is the opening word in {q}?"),
        ("q", "which word is at the start of {q}?"),
    ],
    "count_words": [
        ("np", "the number of words in {q}"),
        ("np", "the word count of this sentence"),
        ("np", "how many words this sentence has"),
        ("cmd", "count the words in this sentence"),
        ("cmd", "count the words in {q}"),
        ("cmd", "tell me how many words the following sentence has"),
        ("cmd", "give the word count of {q}"),
        ("q", "how many words are in this sentence?"),
        ("q", "how many words does {q} have?"),
        ("q", "what is the word count of the sentence below?"),
    ],
    "sentence_type": [
        ("np", "the type of this sentence: statement, question or exclamation"),
        ("np", "the kind of sentence {q} is: statement, question or exclamation"),
        ("cmd", "classify this sentence as a statement, a question or an exclamation"),
        ("cmd", "say whether {q} is a statement, a question or an exclamation"),
        ("cmd", "label the following sentence: statement, question or exclamation"),
        ("q", "is this sentence a statement, a question or an exclamation?"),
        ("q", "is {q} a question, a statement or an exclamation?"),
        ("q", "statement, question or exclamation: which is this sentence?"),
    ],
    "capital": [
        ("np", "the capital of {v}"),
        ("np", "the capital city of this country"),
        ("np", "the capital of the country below"),
        ("cmd", "name the capital city of {v}"),
        ("cmd", "give the capital of the following country"),
        ("cmd", "tell me the capital of {v}"),
        ("q", "what is the capital of {v}?"),
        ("q", "which city is the capital of {v}?"),
        ("q", "what is the capital city of this country?"),
        ("q", "where is the seat of government of {v}?"),
    ],
    "animal_class": [
        ("np", "the class of the {v}: mammal, bird or fish"),
        ("np", "the animal group of this creature: mammal, bird or fish"),
        ("cmd", "classify the animal as a mammal, a bird, or a fish"),
        ("cmd", "say whether {art} {v} is a mammal, bird or fish"),
        ("cmd", "sort this animal into mammal, bird or fish"),
        ("q", "is {art} {v} a mammal, a bird, or a fish?"),
        ("q", "which group does the {v} belong to: mammal, bird or fish?"),
        ("q", "what kind of animal is {art} {v}: mammal, bird or fish?"),
        ("q", "is this animal a mammal, a bird or a fish?"),
    ],
    "antonym": [
        ("np", "the opposite of {q}"),
        ("np", "an antonym of {q}"),
        ("np", "the antonym of this word"),
        ("cmd", "give an antonym of {q}"),
        ("cmd", "find the antonym of the given word"),
        ("cmd", "name a word that means the opposite of {q}"),
        ("cmd", "write the opposite of the following word"),
        ("q", "what is the opposite of {q}?"),
        ("q", "what word means the opposite of {q}?"),
        ("q", "what is an antonym for this word?"),
    ],
}


def normalized(text):
    """What the surface variation cannot change: the first letter's case and the final mark (see surface)."""
    return (text[:1].lower() + text[1:]).rstrip(".?!")


def compose(ask, frame):
    text = frame.format(x=ask)
    return text[:1].upper() + text[1:]


def phrasings(kind, seed=SEED):
    """-> (trained, held_out): lists of (instruction template, has its item in the input field). A quarter of the
    kind's asks and a quarter of each style's frames are drawn as held out (by a generator of its own, seeded with
    the seed and the kind); a phrasing using either is held out, unless the same text (up to the surface variation)
    also arises from trained parts."""
    rng = random.Random(f"{seed}:{kind}")
    asks = ASKS[kind]
    held_asks = set(rng.sample(range(len(asks)), max(2, len(asks) // HELD_OUT_FRACTION)))
    held_frames = {style: set(rng.sample(frames, len(frames) // HELD_OUT_FRACTION)) for style, frames in FRAMES.items()}
    trained, held_out = {}, {}
    for i, (style, ask) in enumerate(asks):
        for frame in FRAMES[style]:
            text = compose(ask, frame)
            part = held_out if i in held_asks or frame in held_frames[style] else trained
            part.setdefault(normalized(text), (text, "{" not in ask))
    return list(trained.values()), [t for key, t in held_out.items() if key not in trained]


def surface(text, rng):
    """Vary what a writer varies without changing the request: the first letter's case, the final mark."""
    if rng.random() < 0.12 and text[:1].isalpha():
        text = text[:1].lower() + text[1:]
    if rng.random() < 0.12 and text[-1:] in ".?!":
        text = text[:-1]
    return text


def quoted(word, rng):
    r = rng.random()
    return f'"{word}"' if r < 0.5 else f"'{word}'" if r < 0.75 else word


# ---------------------------------------------------------------------------------------------- kinds
# Each kind: (family, items, answer) with answer(item) -> (output, key answer). slots(item, rng) fills a phrasing.


def three_distinct(rng, pool, count, key=lambda x: x, ordered=None):
    """`count` distinct triples of pool entries with distinct keys, none already in the order `ordered` sorts them."""
    out = {}
    while len(out) < count:
        triple = tuple(rng.sample(pool, 3))
        if len({key(x) for x in triple}) == 3 and (ordered is None or list(triple) != ordered(triple)):
            out[triple] = None
    return list(out)


def kinds(rng, names=None, free_sentences=False):
    """kind name -> (family, items, answer). Items are distinct within a kind, so a test item is never trained on."""
    numbers = rng.sample(range(10, 10000), 600)
    pairs = list({tuple(sorted(rng.sample(range(10, 1000), 2))): None for _ in range(800)})
    pairs = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pairs]
    sentences = aux_sentences()
    nouns = list(dict.fromkeys(NOUNS + NOUNS_ES + NOUNS_Y + NOUNS_VOWEL_Y))
    adjectives = ADJECTIVES + ADJECTIVES_E + ADJECTIVES_Y
    singulars = {plural(w): w for w in nouns}  # the rule run backwards ("horses" -> "horse", not "hors")
    word_triples = three_distinct(rng, sorted(set(NOUNS)), 600, key=lambda w: w[0], ordered=sorted)
    number_triples = three_distinct(rng, list(range(1, 100)), 600, ordered=sorted)
    typed = (
        [s for s, _, _ in sentences[::3]]
        + [q for _, q, _ in sentences[1::3]]
        + [s[:-1] + "!" for s, _, _ in sentences[2::3]]
    )
    statements = [sentence(subject, action) for subject, _ in PEOPLE for action in PAST_ACTIONS]
    last = statements
    first = [s for s, _, _ in sentences[::2]] + statements[::2]
    count = [s for s, _, _ in sentences[1::2]] + statements[1::2]
    if free_sentences:  # 300 free statements each for the last word, the first word and the word count
        free = free_statements(rng, 900)
        last = free[600:]
        first = [s for s, _, _ in sentences[::4]] + free[:300]
        count = [s for s, _, _ in sentences[1::4]] + free[300:600]
    table = {
        "plural": ("rule", nouns, lambda w: (f'The plural of "{w}" is "{plural(w)}".', plural(w))),
        "past_tense": (
            "rule",
            VERBS + VERBS_E + VERBS_Y,
            lambda w: (f'The past tense of "{w}" is "{past_tense(w)}".', past_tense(w)),
        ),
        "comparative": (
            "rule",
            adjectives,
            lambda w: (f'The comparative of "{w}" is "{comparative(w)}".', comparative(w)),
        ),
        "uppercase": (
            "rule",
            list(dict.fromkeys(CAPS_WORDS + NOUNS)),
            lambda w: (f'In capital letters, "{w}" is "{w.upper()}".', w.upper()),
        ),
        "parity": (
            "rule",
            numbers[:300],
            lambda n: (f"{n} is an {('odd', 'even')[n % 2 == 0]} number.", ("odd", "even")[n % 2 == 0]),
        ),
        "next_number": (
            "rule",
            rng.sample(range(1, 1000), 260),
            lambda n: (f"The number after {n} is {n + 1}.", str(n + 1)),
        ),
        "larger": ("rule", pairs[:400], lambda p: (f"The larger number is {max(p)}.", str(max(p)))),
        "commas": ("rule", rng.sample(range(1000, 10_000_000), 300), lambda n: (f"{n} is written {n:,}.", f"{n:,}")),
        "question": (
            "rule",
            sentences[::2],
            lambda t: (t[1], t[1]),
        ),  # one sentence is never both a question and a negation item
        "negation": ("rule", sentences[1::2], lambda t: (t[2], t[2])),
        "last_word": (
            "rule",
            last,
            lambda s: (f'The last word is "{s.rstrip(".").split()[-1]}".', s.rstrip(".").split()[-1]),
        ),
        "superlative": (
            "rule",
            adjectives,
            lambda w: (f'The superlative of "{w}" is "{superlative(w)}".', superlative(w)),
        ),
        "singular": ("rule", list(singulars), lambda w: (f'The singular of "{w}" is "{singulars[w]}".', singulars[w])),
        "first_letter": (
            "rule",
            list(dict.fromkeys(NOUNS + CAPS_WORDS)),
            lambda w: (f'The word "{w}" starts with "{w[0]}".', w[0]),
        ),
        "smaller": ("rule", pairs[400:], lambda p: (f"The smaller number is {min(p)}.", str(min(p)))),
        "first_word": ("rule", first, lambda s: (f'The first word is "{s.split()[0]}".', s.split()[0])),
        "count_words": ("rule", count, lambda s: (f"The sentence has {len(s.split())} words.", str(len(s.split())))),
        "sentence_type": (
            "rule",
            typed[::2] + free_typed_sentences(rng, 300) if free_sentences else typed,
            lambda s: (f"It is {article(sentence_type(s))} {sentence_type(s)}.", sentence_type(s)),
        ),
        "sort_words": (
            "rule",
            word_triples,
            lambda t: (f"In alphabetical order: {', '.join(sorted(t))}.", ", ".join(sorted(t))),
        ),
        "sort_numbers": (
            "rule",
            number_triples,
            lambda t: (f"From smallest to largest: {', '.join(map(str, sorted(t)))}.", ", ".join(map(str, sorted(t)))),
        ),
        "reverse_words": (
            "rule",
            word_triples[::-1],
            lambda t: (f"In reverse order: {', '.join(t[::-1])}.", ", ".join(t[::-1])),
        ),
        "capital": ("fact", CAPITALS, lambda f: (f"The capital of {f[0]} is {f[1]}.", f[1])),
        "animal_class": (
            "fact",
            [(a, g) for g, names in ANIMALS.items() for a in names],
            lambda f: (f"{article(f[0]).capitalize()} {f[0]} is a {f[1]}.", f[1]),
        ),
        "antonym": ("fact", ANTONYMS, lambda p: (f'The opposite of "{p[0]}" is "{p[1]}".', p[1])),
    }
    return {name: table[name] for name in (names or table)}


# The kinds the committed file holds. Candidates written here but left out, because the tiny base does not learn them
# from 800 LoRA steps (measured: data/README.md): superlative (it mixes it up with the comparative, which shares the
# rule and differs in one word, and loses both), sort_words, sort_numbers and reverse_words (none right in held-out
# phrasings: three items compared or moved at once).
KINDS = (
    "plural",
    "past_tense",
    "comparative",
    "uppercase",
    "parity",
    "next_number",
    "larger",
    "commas",
    "question",
    "negation",
    "last_word",
    "singular",
    "first_letter",
    "smaller",
    "first_word",
    "count_words",
    "sentence_type",
    "capital",
    "animal_class",
    "antonym",
)


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def slots(item, rng):
    """The values a phrasing's slots take for this item, and the input field for asks without a slot."""
    if isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, int) for x in item):  # two numbers
        a, b = item
        return {"a": a, "b": b}, rng.choice([f"{a} and {b}", f"{a}, {b}", f"{a} or {b}"])
    if isinstance(item, tuple) and len(item) == 3 and isinstance(item[0], str) and item[0].endswith((".", "?", "!")):
        item = item[0]  # a (statement, question, negative) triple: the statement is asked about
    if isinstance(item, tuple) and len(item) == 3:  # a list of three words or numbers
        v = ", ".join(map(str, item))
        return {"v": v}, v
    if isinstance(item, tuple):  # a fact: (country, city), (animal, class), (word, antonym)
        return {"v": item[0], "q": quoted(item[0], rng), "art": article(item[0])}, item[0]
    if isinstance(item, int):
        return {"v": item, "q": item}, str(item)
    if item.endswith((".", "?", "!")):  # a sentence is quoted when it stands in the instruction
        return {"v": item, "q": rng.choice([f'"{item}"', f"'{item}'"])}, item
    return {"v": item, "q": quoted(item, rng)}, item


def make_example(kind, item, answer, phrasing_list, rng):
    template, in_input = rng.choice(phrasing_list)
    values, input_text = slots(item, rng)
    output, key = answer(item)
    return {
        "instruction": surface(template.format(**values), rng),
        "input": input_text if in_input else "",
        "output": output,
        "kind": kind,
        "answer": key,
    }


def item_key(item):
    """The identity of an item for the split rule: a word, a number, a country, an animal, a sentence, a list."""
    if isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, int) for x in item):
        return " or ".join(map(str, item))  # a pair of numbers to compare
    if isinstance(item, tuple) and len(item) == 3 and not str(item[0]).endswith((".", "?", "!")):
        return ", ".join(map(str, item))  # a list to sort or reverse
    return str(item[0] if isinstance(item, tuple) else item)


def build_examples(
    seed=SEED, names=KINDS, test_items=TEST_ITEMS_PER_KIND, train_items=TRAIN_ITEMS_PER_KIND, free_sentences=False
):
    """Train + validation + test examples in file order (see the module docstring for the two splits)."""
    rng = random.Random(seed)
    test, trainval = [], []
    for kind, (family, items, answer) in kinds(rng, names, free_sentences).items():
        trained, held_out = phrasings(kind, seed)
        items = [
            item for item in dict.fromkeys(items) if item_key(item).lower() not in PROBE_ITEMS
        ]  # listed twice: one item
        rng.shuffle(items)
        parts = (
            (test, "trained", trained, items[:test_items]),
            (test, "held_out", held_out, items[test_items : 2 * test_items]),
            (trainval, "trained", trained, items[2 * test_items : 2 * test_items + train_items]),
        )
        for part, tag, phrasing_list, chosen in parts:
            for item in chosen:
                part.append(
                    {**make_example(kind, item, answer, phrasing_list, rng), "item": item_key(item), "phrasing": tag}
                )
    rng.shuffle(test)
    rng.shuffle(trainval)
    # shrink the train+validation part until the file-order split puts exactly the test examples last
    n = len(test) + len(trainval)
    while n - int(TRAIN_FRAC * n) - int(VAL_FRAC * n) != len(test):
        trainval.pop()
        n -= 1
    return trainval + test


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output directory")
    parser.add_argument("--seed", type=int, default=SEED, help="another seed: other items, phrasings held out, order")
    parser.add_argument(
        "--kinds", default="", help="comma-separated kinds ('all': every kind written here); default: KINDS"
    )
    parser.add_argument(
        "--free_sentences",
        action="store_true",
        help="the sentence kinds read free sentences of 2 to 9 words (see FREE SENTENCES)",
    )
    args = parser.parse_args()
    names = KINDS if not args.kinds else list(kinds(random.Random(0))) if args.kinds == "all" else args.kinds.split(",")
    examples = build_examples(args.seed, names, free_sentences=args.free_sentences)
    path = os.path.join(args.out, FILENAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(examples, f, indent=1, ensure_ascii=False)
        f.write("\n")
    counts = Counter(ex["kind"] for ex in examples)
    print(f"wrote {len(examples)} examples to {path}")
    for kind, count in counts.items():
        print(f"  {kind:14s} {count}")


if __name__ == "__main__":
    main()
