"""Generate data/instructions.json: a small offline instruction-tuning set in Alpaca format.

Every example is a JSON object with exactly three string keys:

    {"instruction": "...", "input": "...", "output": "..."}      # "input" may be ""

The examples cover about twenty small, checkable kinds of task (unit conversions, arithmetic,
antonyms, plurals, grammar fixes, capitals, short summaries, ...). All word lists and facts are
written in this file; arithmetic and conversion answers are computed, never typed in.

Determinism: the script uses its own seeded random.Random, builds the examples, shuffles them
once with a fixed seed and writes them in that order, so running it again gives a byte-identical
file. Run it with

    python data/make_instructions.py            # writes data/instructions.json
    python data/make_instructions.py --out DIR  # writes DIR/instructions.json

Split convention (train.py implements exactly this on the file order):

    n       = len(examples)
    n_train = int(0.85 * n)
    n_val   = int(0.05 * n)
    train   = examples[:n_train]
    val     = examples[n_train:n_train + n_val]
    test    = examples[n_train + n_val:]          # the remaining ~10%

Written for nanoQLoRA; covered by the project's licence.
"""

import argparse
import json
import os
import random
from collections import Counter

SEED = 1234
FILENAME = "instructions.json"


# ----------------------------------------------------------------------------------------------
# Word lists and facts

# (from-unit plural, to-unit plural, factor): value_in_to_units = value * factor
UNIT_CONVERSIONS = [
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("centimeters", "millimeters", 10),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("feet", "inches", 12),
    ("yards", "feet", 3),
    ("meters", "kilometers", 0.001),
    ("grams", "kilograms", 0.001),
    ("minutes", "hours", 1 / 60),
]
SINGULAR_UNIT = {
    "kilometers": "kilometer", "meters": "meter", "centimeters": "centimeter",
    "millimeters": "millimeter", "kilograms": "kilogram", "grams": "gram", "liters": "liter",
    "milliliters": "milliliter", "hours": "hour", "minutes": "minute", "seconds": "second",
    "days": "day", "weeks": "week", "feet": "foot", "inches": "inch", "yards": "yard",
}

ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("early", "late"), ("open", "closed"), ("full", "empty"), ("strong", "weak"), ("rich", "poor"),
    ("young", "old"), ("tall", "short"), ("wet", "dry"), ("hard", "soft"), ("loud", "quiet"),
    ("buy", "sell"), ("push", "pull"), ("win", "lose"), ("love", "hate"), ("remember", "forget"),
    ("accept", "reject"), ("arrive", "depart"), ("true", "false"), ("clean", "dirty"),
    ("cheap", "expensive"), ("heavy", "light"), ("thick", "thin"), ("wide", "narrow"),
    ("deep", "shallow"), ("safe", "dangerous"), ("brave", "cowardly"), ("polite", "rude"),
    ("ancient", "modern"), ("increase", "decrease"), ("include", "exclude"),
    ("maximum", "minimum"), ("victory", "defeat"), ("friend", "enemy"), ("question", "answer"),
    ("always", "never"), ("inside", "outside"), ("above", "below"), ("before", "after"),
    ("first", "last"), ("easy", "difficult"), ("sharp", "blunt"), ("smooth", "rough"),
    ("tight", "loose"), ("asleep", "awake"), ("visible", "invisible"), ("possible", "impossible"),
    ("patient", "impatient"), ("honest", "dishonest"), ("give", "take"), ("float", "sink"),
    ("borrow", "lend"), ("shout", "whisper"), ("import", "export"), ("entrance", "exit"),
    ("day", "night"), ("north", "south"), ("east", "west"), ("success", "failure"),
    ("presence", "absence"), ("temporary", "permanent"), ("public", "private"),
    ("guilty", "innocent"), ("optimistic", "pessimistic"), ("generous", "stingy"),
    ("up", "down"),
]

SYNONYMS = [
    ("happy", "joyful"), ("big", "large"), ("small", "tiny"), ("fast", "quick"),
    ("smart", "intelligent"), ("begin", "start"), ("end", "finish"), ("choose", "select"),
    ("help", "assist"), ("buy", "purchase"), ("sad", "unhappy"), ("difficult", "hard"),
    ("easy", "simple"), ("brave", "courageous"), ("rich", "wealthy"), ("beautiful", "pretty"),
    ("funny", "amusing"), ("quiet", "silent"), ("shut", "close"), ("jump", "leap"),
    ("talk", "speak"), ("reply", "answer"), ("gift", "present"), ("car", "automobile"),
    ("correct", "right"), ("mistake", "error"), ("enough", "sufficient"), ("hurry", "rush"),
    ("ill", "sick"), ("often", "frequently"), ("strange", "odd"), ("rapid", "swift"),
    ("shout", "yell"), ("story", "tale"), ("strong", "powerful"), ("throw", "toss"),
    ("trip", "journey"), ("huge", "enormous"), ("chilly", "cold"), ("damp", "wet"),
    ("repair", "fix"), ("show", "display"), ("idea", "notion"), ("job", "occupation"),
    ("angry", "irate"), ("glad", "pleased"), ("tired", "weary"), ("scared", "afraid"),
    ("sleepy", "drowsy"), ("destroy", "ruin"), ("permit", "allow"), ("vanish", "disappear"),
    ("center", "middle"), ("kind", "caring"), ("quarrel", "argument"),
]

PLURALS = [
    ("cat", "cats"), ("box", "boxes"), ("city", "cities"), ("child", "children"),
    ("mouse", "mice"), ("tooth", "teeth"), ("foot", "feet"), ("man", "men"), ("woman", "women"),
    ("person", "people"), ("goose", "geese"), ("knife", "knives"), ("leaf", "leaves"),
    ("wolf", "wolves"), ("half", "halves"), ("life", "lives"), ("potato", "potatoes"),
    ("tomato", "tomatoes"), ("hero", "heroes"), ("piano", "pianos"), ("photo", "photos"),
    ("baby", "babies"), ("party", "parties"), ("day", "days"), ("key", "keys"), ("toy", "toys"),
    ("bus", "buses"), ("church", "churches"), ("brush", "brushes"), ("fox", "foxes"),
    ("glass", "glasses"), ("dish", "dishes"), ("sheep", "sheep"), ("deer", "deer"),
    ("series", "series"), ("crisis", "crises"), ("analysis", "analyses"),
    ("phenomenon", "phenomena"), ("criterion", "criteria"), ("ox", "oxen"), ("book", "books"),
    ("apple", "apples"), ("chair", "chairs"), ("story", "stories"), ("lady", "ladies"),
    ("family", "families"), ("roof", "roofs"), ("chief", "chiefs"), ("belief", "beliefs"),
    ("thief", "thieves"), ("shelf", "shelves"), ("wife", "wives"), ("loaf", "loaves"),
    ("calf", "calves"), ("echo", "echoes"), ("quiz", "quizzes"), ("watch", "watches"),
    ("wish", "wishes"), ("monkey", "monkeys"), ("valley", "valleys"), ("radio", "radios"),
    ("zoo", "zoos"),
]

PAST_TENSES = [
    ("walk", "walked"), ("go", "went"), ("eat", "ate"), ("see", "saw"), ("run", "ran"),
    ("write", "wrote"), ("take", "took"), ("come", "came"), ("give", "gave"), ("buy", "bought"),
    ("think", "thought"), ("bring", "brought"), ("teach", "taught"), ("catch", "caught"),
    ("fly", "flew"), ("swim", "swam"), ("sing", "sang"), ("drink", "drank"), ("begin", "began"),
    ("break", "broke"), ("choose", "chose"), ("speak", "spoke"), ("drive", "drove"),
    ("ride", "rode"), ("rise", "rose"), ("fall", "fell"), ("feel", "felt"), ("keep", "kept"),
    ("sleep", "slept"), ("leave", "left"), ("meet", "met"), ("find", "found"), ("sell", "sold"),
    ("tell", "told"), ("stand", "stood"), ("understand", "understood"), ("win", "won"),
    ("lose", "lost"), ("send", "sent"), ("spend", "spent"), ("build", "built"), ("make", "made"),
    ("hear", "heard"), ("pay", "paid"), ("say", "said"), ("do", "did"), ("have", "had"),
    ("know", "knew"), ("grow", "grew"), ("throw", "threw"), ("draw", "drew"), ("wear", "wore"),
    ("hide", "hid"), ("bite", "bit"), ("cut", "cut"), ("put", "put"), ("hit", "hit"),
    ("stop", "stopped"), ("plan", "planned"), ("cry", "cried"), ("try", "tried"),
    ("study", "studied"), ("play", "played"), ("carry", "carried"), ("jump", "jumped"),
    ("dance", "danced"), ("smile", "smiled"), ("open", "opened"), ("visit", "visited"),
]

# Subject-verb agreement: (base form phrase, third-person singular phrase)
VERB_PHRASES = [
    ("walk to school every day", "walks to school every day"),
    ("go to the gym on Mondays", "goes to the gym on Mondays"),
    ("watch the news every evening", "watches the news every evening"),
    ("like chocolate ice cream", "likes chocolate ice cream"),
    ("play the piano very well", "plays the piano very well"),
    ("study in the library after class", "studies in the library after class"),
    ("have a meeting at noon", "has a meeting at noon"),
    ("want to visit Spain next summer", "wants to visit Spain next summer"),
    ("drink coffee in the morning", "drinks coffee in the morning"),
    ("read a book before bed", "reads a book before bed"),
    ("fix old bicycles in the garage", "fixes old bicycles in the garage"),
    ("wash the dishes after dinner", "washes the dishes after dinner"),
    ("live near the river", "lives near the river"),
    ("work at the hospital", "works at the hospital"),
    ("cook dinner on Fridays", "cooks dinner on Fridays"),
    ("sing in the choir", "sings in the choir"),
    ("catch the early train", "catches the early train"),
    ("carry a heavy bag to work", "carries a heavy bag to work"),
    ("don't like loud music", "doesn't like loud music"),
    ("are late for the meeting", "is late for the meeting"),
    ("were at the beach yesterday", "was at the beach yesterday"),
]
SINGULAR_SUBJECTS = ["He", "She", "My sister", "My father", "Our teacher", "The manager",
                     "Tom", "Maria", "My neighbor", "The new student"]
PLURAL_SUBJECTS = ["They", "We", "My parents", "The students", "Our neighbors",
                   "The twins", "My cousins", "The nurses"]

# Active -> passive: (subject, past verb, past participle, object, object is plural)
# Subjects and objects are written as they appear in the middle of a sentence.
ACTIVE_SENTENCES = [
    ("the chef", "cooked", "cooked", "the dinner", False),
    ("the cat", "chased", "chased", "the mouse", False),
    ("the teacher", "graded", "graded", "the exams", True),
    ("my brother", "washed", "washed", "the car", False),
    ("the storm", "destroyed", "destroyed", "the old barn", False),
    ("the committee", "approved", "approved", "the new plan", False),
    ("the children", "painted", "painted", "the fence", False),
    ("Shakespeare", "wrote", "written", "Hamlet", False),
    ("the mechanic", "repaired", "repaired", "the engine", False),
    ("the police", "arrested", "arrested", "the thief", False),
    ("the company", "hired", "hired", "three new engineers", True),
    ("the dog", "ate", "eaten", "my homework", False),
    ("the girl", "broke", "broken", "the window", False),
    ("Sam", "built", "built", "the bookshelf", False),
    ("the students", "planted", "planted", "the trees", True),
    ("the mayor", "opened", "opened", "the new library", False),
    ("Alice", "sent", "sent", "the letters", True),
    ("the farmer", "grew", "grown", "the vegetables", True),
    ("the team", "won", "won", "the championship", False),
    ("my grandmother", "knitted", "knitted", "this sweater", False),
    ("the engineer", "designed", "designed", "the bridge", False),
    ("the museum", "bought", "bought", "the painting", False),
    ("thieves", "stole", "stolen", "the jewels", True),
    ("the nurse", "cleaned", "cleaned", "the wound", False),
    ("the author", "signed", "signed", "the books", True),
    ("the kids", "ate", "eaten", "all the cookies", True),
    ("the gardener", "cut", "cut", "the grass", False),
    ("the judge", "read", "read", "the verdict", False),
    ("Maria", "wrote", "written", "the report", False),
    ("the waiter", "served", "served", "the soup", False),
    ("the scientist", "discovered", "discovered", "a new species", False),
    ("the pilot", "flew", "flown", "the plane", False),
    ("the orchestra", "played", "played", "the symphony", False),
    ("the board", "rejected", "rejected", "the proposal", False),
    ("a volunteer", "found", "found", "the lost dog", False),
    ("my father", "drove", "driven", "the truck", False),
    ("the manager", "signed", "signed", "the contract", False),
    ("the fire", "damaged", "damaged", "two houses", True),
    ("lightning", "struck", "struck", "the tower", False),
    ("the baker", "made", "made", "the wedding cake", False),
]

DEFINITIONS = [
    ("library", "A library is a place where books and other materials are kept for people to read or borrow."),
    ("thermometer", "A thermometer is an instrument used to measure temperature."),
    ("telescope", "A telescope is an instrument that makes distant objects, such as stars, look closer and larger."),
    ("dictionary", "A dictionary is a book or resource that lists words and explains their meanings."),
    ("volcano", "A volcano is an opening in the Earth's crust through which molten rock, ash, and gases escape."),
    ("island", "An island is a piece of land completely surrounded by water."),
    ("peninsula", "A peninsula is a piece of land almost surrounded by water but connected to the mainland."),
    ("glacier", "A glacier is a large, slow-moving mass of ice formed from compacted snow."),
    ("photosynthesis", "Photosynthesis is the process by which plants use sunlight, water, and carbon dioxide to make food and release oxygen."),
    ("democracy", "A democracy is a system of government in which citizens choose their leaders by voting."),
    ("biography", "A biography is an account of a person's life written by someone else."),
    ("autobiography", "An autobiography is an account of a person's life written by that person."),
    ("herbivore", "A herbivore is an animal that eats only plants."),
    ("carnivore", "A carnivore is an animal that eats mainly meat."),
    ("omnivore", "An omnivore is an animal that eats both plants and animals."),
    ("synonym", "A synonym is a word that has the same or nearly the same meaning as another word."),
    ("antonym", "An antonym is a word that means the opposite of another word."),
    ("noun", "A noun is a word that names a person, place, thing, or idea."),
    ("verb", "A verb is a word that describes an action, a state, or an occurrence."),
    ("adjective", "An adjective is a word that describes a noun."),
    ("recipe", "A recipe is a set of instructions for preparing a dish."),
    ("budget", "A budget is a plan for how to spend and save money over a period of time."),
    ("passport", "A passport is an official document that proves a person's identity and nationality for travel abroad."),
    ("calendar", "A calendar is a chart that shows the days, weeks, and months of a year."),
    ("vaccine", "A vaccine is a substance that helps the body build immunity to a disease."),
    ("orbit", "An orbit is the curved path an object follows around a star, planet, or moon."),
    ("habitat", "A habitat is the natural home or environment of an animal or plant."),
    ("evaporation", "Evaporation is the process by which a liquid turns into a gas."),
    ("fossil", "A fossil is the preserved remains or trace of a plant or animal that lived long ago."),
    ("migration", "Migration is the seasonal movement of animals from one region to another."),
    ("triangle", "A triangle is a shape with three straight sides and three angles."),
    ("circumference", "The circumference is the distance around the edge of a circle."),
    ("prime number", "A prime number is a whole number greater than 1 whose only divisors are 1 and itself."),
    ("hypothesis", "A hypothesis is a proposed explanation that can be tested by experiment or observation."),
    ("metaphor", "A metaphor is a figure of speech that describes something by saying it is something else."),
    ("simile", "A simile is a figure of speech that compares two things using 'like' or 'as'."),
    ("archipelago", "An archipelago is a group of islands."),
    ("nocturnal", "'Nocturnal' describes an animal that is active mainly at night."),
    ("predator", "A predator is an animal that hunts and eats other animals."),
    ("umbrella", "An umbrella is a folding canopy held over the head for protection from rain or sun."),
    ("pharmacy", "A pharmacy is a shop where medicines are prepared and sold."),
    ("harvest", "A harvest is the gathering of ripe crops from the fields."),
    ("ecosystem", "An ecosystem is a community of living things interacting with each other and their environment."),
    ("gravity", "Gravity is the force that pulls objects toward each other, such as toward the center of the Earth."),
    ("equator", "The equator is an imaginary line around the middle of the Earth, halfway between the North and South Poles."),
    ("inflation", "Inflation is a general rise in prices over time, which reduces what money can buy."),
    ("password", "A password is a secret string of characters used to access something, such as a computer account."),
    ("algorithm", "An algorithm is a step-by-step procedure for solving a problem or completing a task."),
    ("molecule", "A molecule is a group of two or more atoms bonded together."),
    ("mammal", "A mammal is a warm-blooded animal with hair or fur that feeds its young with milk."),
    ("compass", "A compass is an instrument with a magnetic needle that points north."),
    ("thesaurus", "A thesaurus is a reference book that lists words together with their synonyms."),
    ("punctual", "'Punctual' describes someone who arrives or does things at the agreed time."),
]

ANIMALS = {
    "mammal": ["dog", "cat", "horse", "cow", "whale", "dolphin", "bat", "elephant", "lion",
               "tiger", "rabbit", "mouse", "bear", "giraffe", "kangaroo", "monkey", "sheep",
               "goat", "pig", "fox", "wolf", "deer", "squirrel", "otter", "camel", "zebra",
               "hedgehog", "seal"],
    "bird": ["eagle", "sparrow", "penguin", "ostrich", "owl", "parrot", "pigeon", "duck", "swan",
             "robin", "crow", "flamingo", "hawk", "chicken", "peacock", "hummingbird",
             "seagull", "woodpecker", "goose", "emu"],
    "fish": ["salmon", "tuna", "trout", "shark", "goldfish", "cod", "carp", "herring", "sardine",
             "catfish", "mackerel", "perch", "eel", "swordfish", "halibut", "pike", "anchovy",
             "seahorse"],
}

# (country as a headword, country as it reads mid-sentence, capital)
CAPITALS = [
    ("France", "France", "Paris"), ("Germany", "Germany", "Berlin"), ("Italy", "Italy", "Rome"),
    ("Spain", "Spain", "Madrid"), ("Portugal", "Portugal", "Lisbon"), ("Japan", "Japan", "Tokyo"),
    ("China", "China", "Beijing"), ("India", "India", "New Delhi"),
    ("Australia", "Australia", "Canberra"), ("Canada", "Canada", "Ottawa"),
    ("Brazil", "Brazil", "Brasília"), ("Argentina", "Argentina", "Buenos Aires"),
    ("Mexico", "Mexico", "Mexico City"), ("Egypt", "Egypt", "Cairo"), ("Kenya", "Kenya", "Nairobi"),
    ("Nigeria", "Nigeria", "Abuja"), ("Russia", "Russia", "Moscow"), ("Turkey", "Turkey", "Ankara"),
    ("Greece", "Greece", "Athens"), ("Sweden", "Sweden", "Stockholm"), ("Norway", "Norway", "Oslo"),
    ("Finland", "Finland", "Helsinki"), ("Denmark", "Denmark", "Copenhagen"),
    ("Poland", "Poland", "Warsaw"), ("Austria", "Austria", "Vienna"),
    ("Hungary", "Hungary", "Budapest"), ("Ireland", "Ireland", "Dublin"),
    ("United Kingdom", "the United Kingdom", "London"), ("Peru", "Peru", "Lima"),
    ("Chile", "Chile", "Santiago"), ("Colombia", "Colombia", "Bogotá"),
    ("Venezuela", "Venezuela", "Caracas"), ("Thailand", "Thailand", "Bangkok"),
    ("Vietnam", "Vietnam", "Hanoi"), ("Philippines", "the Philippines", "Manila"),
    ("South Korea", "South Korea", "Seoul"), ("Iran", "Iran", "Tehran"), ("Iraq", "Iraq", "Baghdad"),
    ("Saudi Arabia", "Saudi Arabia", "Riyadh"), ("Pakistan", "Pakistan", "Islamabad"),
    ("Bangladesh", "Bangladesh", "Dhaka"), ("Nepal", "Nepal", "Kathmandu"),
    ("Morocco", "Morocco", "Rabat"), ("Ethiopia", "Ethiopia", "Addis Ababa"),
    ("Ghana", "Ghana", "Accra"), ("New Zealand", "New Zealand", "Wellington"),
    ("Cuba", "Cuba", "Havana"), ("Belgium", "Belgium", "Brussels"),
    ("Czech Republic", "the Czech Republic", "Prague"), ("Romania", "Romania", "Bucharest"),
    ("Ukraine", "Ukraine", "Kyiv"), ("Iceland", "Iceland", "Reykjavik"),
    ("Uruguay", "Uruguay", "Montevideo"), ("Ecuador", "Ecuador", "Quito"),
    ("Croatia", "Croatia", "Zagreb"), ("Serbia", "Serbia", "Belgrade"),
    ("Bulgaria", "Bulgaria", "Sofia"), ("Slovakia", "Slovakia", "Bratislava"),
    ("Slovenia", "Slovenia", "Ljubljana"), ("Lithuania", "Lithuania", "Vilnius"),
    ("Latvia", "Latvia", "Riga"), ("Estonia", "Estonia", "Tallinn"),
    ("Jamaica", "Jamaica", "Kingston"), ("Uganda", "Uganda", "Kampala"),
    ("Senegal", "Senegal", "Dakar"), ("Algeria", "Algeria", "Algiers"),
    ("Tunisia", "Tunisia", "Tunis"), ("Afghanistan", "Afghanistan", "Kabul"),
    ("Mongolia", "Mongolia", "Ulaanbaatar"), ("Qatar", "Qatar", "Doha"),
    ("Jordan", "Jordan", "Amman"), ("Lebanon", "Lebanon", "Beirut"),
    ("United States", "the United States", "Washington, D.C."),
]

RHYMES = [
    ("cat", "hat"), ("dog", "log"), ("cake", "lake"), ("moon", "spoon"), ("tree", "bee"),
    ("star", "car"), ("light", "night"), ("rain", "train"), ("book", "cook"), ("ring", "king"),
    ("boat", "coat"), ("fox", "box"), ("bell", "shell"), ("bear", "chair"), ("sun", "fun"),
    ("pen", "ten"), ("mouse", "house"), ("goat", "note"), ("fish", "dish"), ("snake", "rake"),
    ("frog", "fog"), ("bread", "head"), ("blue", "shoe"), ("green", "queen"), ("red", "bed"),
    ("cold", "gold"), ("sand", "hand"), ("nose", "rose"), ("bright", "kite"), ("fly", "sky"),
    ("sleep", "sheep"), ("hill", "mill"), ("town", "crown"), ("game", "name"),
    ("door", "floor"), ("meat", "seat"), ("snow", "slow"), ("hop", "top"), ("wall", "ball"),
    ("pig", "wig"), ("bug", "rug"), ("cheese", "peas"),
]

MISSPELLINGS = [
    ("recieve", "receive"), ("beleive", "believe"), ("seperate", "separate"),
    ("definately", "definitely"), ("occured", "occurred"), ("untill", "until"),
    ("wierd", "weird"), ("tommorow", "tomorrow"), ("accomodate", "accommodate"),
    ("begining", "beginning"), ("calender", "calendar"), ("enviroment", "environment"),
    ("goverment", "government"), ("neccessary", "necessary"), ("occassion", "occasion"),
    ("publically", "publicly"), ("recomend", "recommend"), ("succesful", "successful"),
    ("truely", "truly"), ("wich", "which"), ("becuase", "because"), ("knowlege", "knowledge"),
    ("libary", "library"), ("adress", "address"), ("arguement", "argument"),
    ("embarass", "embarrass"), ("existance", "existence"), ("foriegn", "foreign"),
    ("gaurd", "guard"), ("happend", "happened"), ("independant", "independent"),
    ("millenium", "millennium"), ("mispell", "misspell"), ("noticable", "noticeable"),
    ("persue", "pursue"), ("posession", "possession"), ("refered", "referred"),
    ("rythm", "rhythm"), ("tounge", "tongue"), ("vaccum", "vacuum"), ("wensday", "Wednesday"),
    ("febuary", "February"), ("restaraunt", "restaurant"), ("sucess", "success"),
    ("beautifull", "beautiful"), ("grammer", "grammar"), ("acheive", "achieve"),
    ("peice", "piece"), ("buisness", "business"), ("curiousity", "curiosity"),
    ("temperture", "temperature"), ("probaly", "probably"),
]

# (subject as it reads mid-sentence, auxiliary verb, rest of the sentence)
AUX_STATEMENTS = [
    ("the museum", "is", "open on Sundays"), ("she", "can", "speak three languages"),
    ("they", "are", "moving to a new house next month"), ("he", "has", "finished his homework"),
    ("you", "will", "be at the meeting tomorrow"), ("the train", "is", "running late this morning"),
    ("the children", "are", "playing in the garden"), ("we", "should", "leave before it gets dark"),
    ("the shop", "was", "closed yesterday"), ("your brother", "can", "fix the bike"),
    ("the tickets", "were", "sold out in an hour"), ("the soup", "is", "too salty"),
    ("she", "has", "visited Japan twice"), ("the package", "will", "arrive on Friday"),
    ("the cat", "was", "sleeping on the sofa"), ("they", "have", "already eaten dinner"),
    ("the bridge", "is", "safe to cross"), ("he", "could", "hear the music from his room"),
    ("the test", "was", "harder than expected"), ("the printer", "is", "out of paper"),
    ("the guests", "have", "arrived"), ("it", "is", "going to rain this afternoon"),
    ("the baby", "is", "asleep"), ("our flight", "was", "delayed by two hours"),
    ("you", "can", "swim"), ("the store", "will", "open at nine"),
    ("the movie", "was", "based on a true story"), ("the students", "were", "listening carefully"),
    ("she", "is", "the new team leader"), ("the water", "is", "warm enough for swimming"),
    ("Tom", "has", "lived here for ten years"), ("the keys", "are", "on the kitchen table"),
    ("Maria", "will", "bring the dessert"), ("the road", "was", "covered in snow"),
    ("he", "should", "see a doctor"),
]
DO_STATEMENTS = [
    ("She likes green tea.", "Does she like green tea?"),
    ("They play tennis on weekends.", "Do they play tennis on weekends?"),
    ("He works at the bank.", "Does he work at the bank?"),
    ("The bus stops here.", "Does the bus stop here?"),
    ("You remembered the tickets.", "Did you remember the tickets?"),
    ("The dog barked all night.", "Did the dog bark all night?"),
    ("Your sister lives in Madrid.", "Does your sister live in Madrid?"),
    ("We need more milk.", "Do we need more milk?"),
    ("The meeting started on time.", "Did the meeting start on time?"),
    ("He speaks French fluently.", "Does he speak French fluently?"),
    ("They won the game.", "Did they win the game?"),
    ("The plant needs more water.", "Does the plant need more water?"),
]

SORT_WORDS = [
    "apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum",
    "zebra", "tiger", "lion", "horse", "rabbit", "monkey", "eagle", "dolphin", "owl", "whale",
    "river", "mountain", "forest", "desert", "ocean", "valley", "island", "canyon", "meadow",
    "pencil", "notebook", "eraser", "ruler", "scissors", "stapler", "marker", "folder",
    "violin", "guitar", "drum", "flute", "piano", "trumpet", "harp", "cello",
    "carrot", "potato", "onion", "garlic", "spinach", "pepper", "celery", "turnip",
    "blue", "green", "yellow", "purple", "silver", "crimson", "orchid", "amber",
    "table", "chair", "lamp", "sofa", "shelf", "mirror", "carpet", "window", "basket",
    "kettle", "jacket", "bridge", "candle", "ladder", "bottle", "anchor",
]

SENTIMENT_THINGS = ["movie", "concert", "meal", "book", "hotel", "holiday", "game", "play",
                    "course", "restaurant", "museum tour", "podcast", "phone", "album"]
POSITIVE_TEMPLATES = [
    "I really enjoyed the {t}.", "The {t} was absolutely wonderful.", "What a fantastic {t}!",
    "The {t} exceeded all my expectations.", "I would happily recommend this {t} to anyone.",
    "The {t} made my whole week.", "Honestly, the {t} was a delight from start to finish.",
]
NEGATIVE_TEMPLATES = [
    "The {t} was a complete waste of money.", "I was really disappointed by the {t}.",
    "I would not recommend this {t} to anyone.", "The {t} was dull and disappointing.",
    "What a terrible {t}.", "The {t} left me feeling frustrated.", "I regret choosing this {t}.",
]
HANDWRITTEN_SENTIMENT = [
    ("I expected to hate it, but the film turned out to be brilliant.", "positive"),
    ("The food looked great but tasted awful.", "negative"),
    ("Our guide was friendly, funny, and full of interesting stories.", "positive"),
    ("The train was late again and nobody told us why.", "negative"),
    ("This is the most comfortable pair of shoes I have ever owned.", "positive"),
    ("The battery dies after only an hour, which is useless.", "negative"),
    ("My neighbors surprised me with a homemade cake, and it was lovely.", "positive"),
    ("The customer service agent hung up on me twice.", "negative"),
    ("Even in the rain, the walk along the coast was beautiful.", "positive"),
    ("The room smelled of smoke and the sheets were stained.", "negative"),
    ("I can't stop smiling after that news.", "positive"),
    ("Nothing about this update works the way it should.", "negative"),
    ("The kids had a great time at the science fair.", "positive"),
    ("I waited forty minutes for a cold sandwich.", "negative"),
    ("Thank you so much for your kind and thoughtful help.", "positive"),
    ("The instructions were confusing and half the parts were missing.", "negative"),
]

# (text, one-sentence summary)
SUMMARIES = [
    ("The town council met on Tuesday to discuss the new bike lanes. Residents spoke both for and against the plan. After two hours of debate, the council voted to build the lanes next spring.",
     "After a long debate, the town council voted to build new bike lanes next spring."),
    ("Maya had practiced the violin every evening for months. On the night of the school concert, her hands shook as she walked on stage. She played her piece without a single mistake, and the audience cheered.",
     "After months of practice, Maya overcame her nerves and played perfectly at the school concert."),
    ("Honeybees collect nectar from flowers and carry it back to the hive. Inside, worker bees turn the nectar into honey by reducing its water content. The honey is stored in wax cells and feeds the colony through the winter.",
     "Honeybees turn flower nectar into honey, which they store to feed the colony in winter."),
    ("The bakery on Elm Street opened in 1985. It became famous for its rye bread and cinnamon rolls. Next month, after almost forty years, the owners will retire and close the shop.",
     "A well-loved bakery on Elm Street will close next month when its owners retire."),
    ("Heavy rain fell across the region for three days. Several rivers burst their banks, and hundreds of homes were flooded. Emergency crews used boats to rescue people who were trapped.",
     "Three days of heavy rain caused floods, and rescue crews used boats to reach trapped residents."),
    ("Regular exercise strengthens the heart and lungs. It also improves mood and helps people sleep better. Health experts recommend at least 150 minutes of moderate activity each week for adults.",
     "Regular exercise benefits body and mind, and adults are advised to get at least 150 minutes a week."),
    ("Leo forgot his umbrella on the bus. When he called the lost property office, nobody had handed it in. The next morning, the same driver returned it to him at the bus stop.",
     "Leo left his umbrella on the bus, and the driver returned it to him the next morning."),
    ("The museum's new exhibition shows tools and jewelry from ancient Egypt. Many of the objects have never been displayed before. The exhibition runs until the end of August, and entry is free for children.",
     "A museum is showing rarely seen objects from ancient Egypt until the end of August."),
    ("A small software company released an app that helps people track how much water they drink. The app sends reminders throughout the day. In its first month, more than fifty thousand people downloaded it.",
     "A new app that reminds people to drink water was downloaded over fifty thousand times in a month."),
    ("Priya wanted to grow tomatoes on her balcony. Her first plants died because they got too little sun. She moved the pots to the sunny side, and by August she was picking tomatoes every day.",
     "After moving her plants to a sunnier spot, Priya grew plenty of tomatoes on her balcony."),
    ("The library will be closed for renovations from March to June. During that time, a mobile library van will visit the town square every Saturday. Books can still be returned at the drop box by the front door.",
     "The library will close for renovations, but a mobile van and a drop box will keep some services running."),
    ("Octopuses have three hearts and blue blood. They can change the color and texture of their skin to hide from predators. Scientists consider them among the most intelligent invertebrates.",
     "Octopuses are unusual, intelligent animals that can change their skin to hide from predators."),
    ("The school football team lost their first four games of the season. Their coach changed the training schedule and focused on teamwork. The team went on to win the next six games in a row.",
     "After a poor start, the school football team changed its training and won six games in a row."),
    ("Sam and Jo planned a picnic in the park. Just as they unpacked the food, it began to pour with rain. They ran to a nearby café and ate their sandwiches there instead.",
     "Rain spoiled Sam and Jo's picnic, so they ate their sandwiches in a café instead."),
    ("Recycling an aluminum can uses far less energy than making a new can from raw materials. Aluminum can be recycled again and again without losing quality. That is why many cities collect cans separately.",
     "Cities collect aluminum cans because recycling them saves energy and can be repeated endlessly."),
    ("The price of coffee beans rose sharply this year after poor harvests in several countries. Many cafés have raised their prices. Some customers have started making coffee at home to save money.",
     "Poor harvests pushed up coffee prices, so cafés charge more and some people now brew at home."),
    ("Grandpa Joe has kept a diary every day since 1962. His notebooks fill three shelves in the attic. This winter, his granddaughter began typing them up so the whole family can read them.",
     "Grandpa Joe's decades of diaries are being typed up by his granddaughter for the family to read."),
    ("A lost kitten was found inside a car engine in a supermarket parking lot. Firefighters spent an hour carefully freeing it. The kitten was unharmed and has now been adopted by one of the firefighters.",
     "Firefighters freed a kitten trapped in a car engine, and one of them adopted it."),
    ("The city plans to plant ten thousand trees over the next five years. Trees provide shade, clean the air, and reduce flooding. Residents can ask for a tree to be planted on their street.",
     "The city will plant ten thousand trees over five years, and residents can request trees for their streets."),
    ("Ana started learning Japanese by studying for fifteen minutes every morning. After a year, she could read simple books and hold basic conversations. She says small daily habits made the difference.",
     "By studying for fifteen minutes a day, Ana learned basic Japanese in a year."),
    ("The power went out across the neighborhood during the storm. Families lit candles and played board games by torchlight. Electricity was restored shortly after midnight.",
     "A storm knocked out the neighborhood's power until shortly after midnight."),
    ("Scientists tracked a group of gray whales migrating along the Pacific coast. The whales traveled thousands of kilometers between their feeding and breeding grounds. The study will help protect the routes they use.",
     "Scientists tracked migrating gray whales to help protect their long migration routes."),
    ("The restaurant changed its menu to use only vegetables grown within fifty miles. The chef visits local farms every week. Since the change, bookings have doubled.",
     "A restaurant that switched to locally grown vegetables has seen its bookings double."),
    ("Tom's laptop stopped working the night before his essay was due. He borrowed his sister's computer and rewrote the essay from his notes. He submitted it with ten minutes to spare.",
     "When his laptop broke, Tom rewrote his essay on a borrowed computer and submitted it just in time."),
    ("A new footbridge now links the two halves of the village across the river. Before, people had to drive three miles to the nearest road bridge. The footbridge was paid for by a local fundraising campaign.",
     "A community-funded footbridge now joins the two sides of the village, saving a long detour."),
]


# ----------------------------------------------------------------------------------------------
# Helpers

def quote(word):
    return f'"{word}"'


def a_or_an(word):
    return "an" if word[0].lower() in "aeiou" else "a"


def capitalize_first(text):
    return text[0].upper() + text[1:]


def format_number(x):
    """Integers print without a decimal point; other values with at most 3 decimals."""
    if abs(x - round(x)) < 1e-9:
        return str(int(round(x)))
    return f"{x:.3f}".rstrip("0").rstrip(".")


def unit_name(unit_plural, value):
    return SINGULAR_UNIT[unit_plural] if value == 1 else unit_plural


def example(instruction, input_text, output):
    return {"instruction": instruction, "input": input_text, "output": output}


# ----------------------------------------------------------------------------------------------
# One function per kind of task. Each returns a list of examples.

def make_unit_conversions(rng):
    templates = [
        lambda v, a, b: example(f"Convert {v} {a} to {b}.", "", None),
        lambda v, a, b: example(f"Convert the following measurement to {b}.", f"{v} {a}", None),
        lambda v, a, b: example(f"How many {b} are in {v} {a}?", "", None),
        lambda v, a, b: example(f"Express {v} {a} in {b}.", "", None),
    ]
    examples = []
    for from_unit, to_unit, factor in UNIT_CONVERSIONS:
        if factor >= 1:
            candidates = list(range(1, 25)) + [1.5, 2.5, 3.5, 7.5]
        elif to_unit == "hours":
            candidates = list(range(30, 601, 30))
        else:  # meters -> kilometers, grams -> kilograms
            candidates = list(range(500, 12001, 500))
        for value in rng.sample(candidates, 7):
            result = value * factor
            v_text = format_number(value)
            r_text = format_number(result)
            ex = rng.choice(templates)(v_text, unit_name(from_unit, value), to_unit)
            ex["output"] = (f"{v_text} {unit_name(from_unit, value)} is "
                            f"{r_text} {unit_name(to_unit, result)}.")
            examples.append(ex)
    return examples


def make_temperatures(rng):
    examples = []
    for celsius in range(-40, 101, 5):
        fahrenheit = celsius * 9 // 5 + 32  # exact: celsius is a multiple of 5
        style = rng.randrange(4)
        if style == 0:
            examples.append(example(f"Convert {celsius} degrees Celsius to Fahrenheit.", "",
                                    f"{celsius} degrees Celsius is {fahrenheit} degrees Fahrenheit."))
        elif style == 1:
            examples.append(example("Convert this temperature from Celsius to Fahrenheit.",
                                    f"{celsius}°C", f"{celsius}°C is {fahrenheit}°F."))
        elif style == 2:
            examples.append(example(f"What is {celsius} degrees Celsius in Fahrenheit?", "",
                                    f"{celsius} degrees Celsius equals {fahrenheit} degrees Fahrenheit."))
        else:
            examples.append(example(f"Convert {fahrenheit} degrees Fahrenheit to Celsius.", "",
                                    f"{fahrenheit} degrees Fahrenheit is {celsius} degrees Celsius."))
    return examples


def make_arithmetic(rng, per_operation=32):
    templates = {
        "+": [
            lambda a, b: (f"What is {a} + {b}?", ""),
            lambda a, b: (f"Add {a} and {b}.", ""),
            lambda a, b: (f"Calculate the sum of {a} and {b}.", ""),
            lambda a, b: ("Solve the following addition problem.", f"{a} + {b}"),
        ],
        "-": [
            lambda a, b: (f"What is {a} - {b}?", ""),
            lambda a, b: (f"Subtract {b} from {a}.", ""),
            lambda a, b: ("Solve the following subtraction problem.", f"{a} - {b}"),
            lambda a, b: ("Calculate the result.", f"{a} - {b}"),
        ],
        "*": [
            lambda a, b: (f"What is {a} times {b}?", ""),
            lambda a, b: (f"Multiply {a} by {b}.", ""),
            lambda a, b: (f"Calculate the product of {a} and {b}.", ""),
            lambda a, b: ("Solve the following multiplication problem.", f"{a} × {b}"),
        ],
    }
    symbol = {"+": "+", "-": "-", "*": "×"}
    word = {"+": "plus", "-": "minus", "*": "times"}
    examples = []
    for op in ["+", "-", "*"]:
        seen = set()
        while len(seen) < per_operation:
            if op == "*":
                a, b = rng.randint(2, 12), rng.randint(2, 12)
            else:
                a, b = rng.randint(1, 99), rng.randint(1, 99)
                if op == "-" and b > a:
                    a, b = b, a
            if (a, b) in seen:
                continue
            seen.add((a, b))
            result = a + b if op == "+" else a - b if op == "-" else a * b
            instruction, input_text = rng.choice(templates[op])(a, b)
            if rng.random() < 0.5:
                output = f"{a} {symbol[op]} {b} = {result}."
            else:
                output = f"{a} {word[op]} {b} equals {result}."
            examples.append(example(instruction, input_text, output))
    return examples


def make_even_odd(rng):
    numbers = sorted(rng.sample(range(0, 1000), 40))
    templates = [
        lambda n: (f"Is {n} an even or an odd number?", ""),
        lambda n: ("Classify the number as even or odd.", str(n)),
        lambda n: (f"Tell me whether {n} is even or odd.", ""),
    ]
    examples = []
    for n in numbers:
        parity = "even" if n % 2 == 0 else "odd"
        reason = "divisible by 2" if parity == "even" else "not divisible by 2"
        instruction, input_text = rng.choice(templates)(n)
        examples.append(example(instruction, input_text,
                                f"{n} is an {parity} number because it is {reason}."))
    return examples


def make_compare_numbers(rng):
    examples = []
    seen = set()
    while len(examples) < 30:
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        if a == b or (a, b) in seen:
            continue
        seen.add((a, b))
        if rng.random() < 0.5:
            instruction, input_text = f"Which number is larger, {a} or {b}?", ""
            output = f"{max(a, b)} is larger than {min(a, b)}."
        else:
            instruction, input_text = "Which of these two numbers is smaller?", f"{a}, {b}"
            output = f"{min(a, b)} is smaller than {max(a, b)}."
        examples.append(example(instruction, input_text, output))
    return examples


def make_antonyms(rng):
    templates = [
        lambda w: (f"What is the opposite of {quote(w)}?", ""),
        lambda w: ("Give an antonym for the following word.", w),
        lambda w: (f"Provide a word that means the opposite of {quote(w)}.", ""),
        lambda w: ("Find the antonym of the given word.", w),
    ]
    outputs = [
        lambda w, a: f"The opposite of {quote(w)} is {quote(a)}.",
        lambda w, a: f"An antonym of {quote(w)} is {quote(a)}.",
    ]
    examples = []
    for word, antonym in ANTONYMS:
        instruction, input_text = rng.choice(templates)(word)
        examples.append(example(instruction, input_text, rng.choice(outputs)(word, antonym)))
    return examples


def make_synonyms(rng):
    templates = [
        lambda w: (f"Give a synonym for {quote(w)}.", ""),
        lambda w: ("Provide a synonym for the following word.", w),
        lambda w: (f"What is another word for {quote(w)}?", ""),
        lambda w: ("Suggest a word with a similar meaning.", w),
    ]
    outputs = [
        lambda w, s: f"A synonym for {quote(w)} is {quote(s)}.",
        lambda w, s: f"Another word for {quote(w)} is {quote(s)}.",
    ]
    examples = []
    for word, synonym in SYNONYMS:
        instruction, input_text = rng.choice(templates)(word)
        examples.append(example(instruction, input_text, rng.choice(outputs)(word, synonym)))
    return examples


def make_plurals(rng):
    templates = [
        lambda w: (f"What is the plural of {quote(w)}?", ""),
        lambda w: ("Write the plural form of the following noun.", w),
        lambda w: (f"Give the plural form of the word {quote(w)}.", ""),
    ]
    examples = []
    for singular, plural in PLURALS:
        instruction, input_text = rng.choice(templates)(singular)
        if singular == plural:
            output = f"The plural of {quote(singular)} is also {quote(plural)}."
        else:
            output = f"The plural of {quote(singular)} is {quote(plural)}."
        examples.append(example(instruction, input_text, output))
    return examples


def make_past_tenses(rng):
    templates = [
        lambda v: (f"What is the past tense of {quote(v)}?", ""),
        lambda v: ("Give the simple past tense of the following verb.", v),
        lambda v: (f"Write the past tense form of the verb {quote(v)}.", ""),
    ]
    examples = []
    for verb, past in PAST_TENSES:
        instruction, input_text = rng.choice(templates)(verb)
        if verb == past:
            output = f"The past tense of {quote(verb)} is also {quote(past)}."
        else:
            output = f"The past tense of {quote(verb)} is {quote(past)}."
        examples.append(example(instruction, input_text, output))
    return examples


def make_subject_verb_agreement(rng, count=60):
    instructions = [
        "Correct the grammar in the following sentence.",
        "Fix the subject-verb agreement error in this sentence.",
        "Rewrite the sentence so that the verb agrees with its subject.",
        "Correct the grammatical mistake in this sentence.",
    ]
    examples = []
    seen = set()
    while len(examples) < count:
        base, third_person = rng.choice(VERB_PHRASES)
        if rng.random() < 0.6:
            subject = rng.choice(SINGULAR_SUBJECTS)
            wrong, right = f"{subject} {base}.", f"{subject} {third_person}."
        else:
            subject = rng.choice(PLURAL_SUBJECTS)
            wrong, right = f"{subject} {third_person}.", f"{subject} {base}."
        if wrong in seen:
            continue
        seen.add(wrong)
        examples.append(example(rng.choice(instructions), wrong, right))
    return examples


def make_active_to_passive(rng):
    instructions = [
        "Rewrite the sentence in the passive voice.",
        "Change this sentence from active to passive voice.",
        "Convert the following sentence to the passive voice.",
    ]
    examples = []
    for subject, past, participle, obj, plural in ACTIVE_SENTENCES:
        active = f"{capitalize_first(subject)} {past} {obj}."
        passive = f"{capitalize_first(obj)} {'were' if plural else 'was'} {participle} by {subject}."
        examples.append(example(rng.choice(instructions), active, passive))
    return examples


def make_definitions(rng):
    templates = [
        lambda w: (f"Define the word {quote(w)}.", ""),
        lambda w: ("Give a short definition of the following word.", w),
        lambda w: (f"What does {quote(w)} mean?", ""),
        lambda w: ("Explain the meaning of this term in one sentence.", w),
    ]
    examples = []
    for word, definition in DEFINITIONS:
        instruction, input_text = rng.choice(templates)(word)
        examples.append(example(instruction, input_text, definition))
    return examples


def make_animal_classes(rng):
    templates = [
        lambda a: (f"Is {a_or_an(a)} {a} a mammal, a bird, or a fish?", ""),
        lambda a: ("Classify the animal as a mammal, a bird, or a fish.", a),
        lambda a: (f"Which group does the {a} belong to: mammals, birds, or fish?", ""),
    ]
    examples = []
    for group, animals in ANIMALS.items():
        for animal in animals:
            instruction, input_text = rng.choice(templates)(animal)
            examples.append(example(instruction, input_text,
                                    f"{capitalize_first(a_or_an(animal))} {animal} is {a_or_an(group)} {group}."))
    return examples


def make_sentiment(rng, per_label=24):
    instructions = [
        "Classify the sentiment of this sentence as positive or negative.",
        "Is the following sentence positive or negative?",
        "Decide whether the review below expresses a positive or a negative opinion.",
    ]
    outputs = [
        lambda label: f"The sentiment of the sentence is {label}.",
        lambda label: f"The sentence is {label}.",
    ]
    sentences = list(HANDWRITTEN_SENTIMENT)
    for label, templates in [("positive", POSITIVE_TEMPLATES), ("negative", NEGATIVE_TEMPLATES)]:
        combos = [(t, thing) for t in templates for thing in SENTIMENT_THINGS]
        for template, thing in rng.sample(combos, per_label):
            sentences.append((template.format(t=thing), label))
    return [example(rng.choice(instructions), s, rng.choice(outputs)(label))
            for s, label in sentences]


def make_summaries(rng):
    instructions = [
        "Summarize the following text in one sentence.",
        "Write a one-sentence summary of this passage.",
        "Give a brief, single-sentence summary of the text below.",
    ]
    return [example(rng.choice(instructions), text, summary) for text, summary in SUMMARIES]


def make_capitals(rng):
    templates = [
        lambda head, mid: (f"What is the capital of {mid}?", ""),
        lambda head, mid: (f"Name the capital city of {mid}.", ""),
        lambda head, mid: ("Identify the capital of the given country.", head),
    ]
    examples = []
    for head, mid, capital in CAPITALS:
        instruction, input_text = rng.choice(templates)(head, mid)
        examples.append(example(instruction, input_text,
                                f"The capital of {mid} is {capital}."))
    return examples


def make_rhymes(rng):
    templates = [
        lambda w: (f"Give a word that rhymes with {quote(w)}.", ""),
        lambda w: ("Suggest a rhyme for the following word.", w),
        lambda w: (f"What word rhymes with {quote(w)}?", ""),
    ]
    examples = []
    for word, rhyme in RHYMES:
        instruction, input_text = rng.choice(templates)(word)
        examples.append(example(instruction, input_text,
                                f"A word that rhymes with {quote(word)} is {quote(rhyme)}."))
    return examples


def make_alphabetical_sorting(rng, count=40):
    instructions = [
        "Sort these words in alphabetical order.",
        "Arrange the following words alphabetically.",
        "Put the words below in alphabetical order.",
    ]
    examples = []
    seen = set()
    while len(examples) < count:
        words = rng.sample(SORT_WORDS, rng.randint(3, 6))
        if tuple(words) in seen or words == sorted(words):
            continue
        seen.add(tuple(words))
        examples.append(example(rng.choice(instructions), ", ".join(words),
                                "In alphabetical order: " + ", ".join(sorted(words)) + "."))
    return examples


def make_spelling(rng):
    templates = [
        lambda w: ("Correct the spelling of this word.", w),
        lambda w: (f"The word {quote(w)} is misspelled. What is the correct spelling?", ""),
        lambda w: ("Fix the spelling mistake in the following word.", w),
    ]
    examples = []
    for wrong, right in MISSPELLINGS:
        instruction, input_text = rng.choice(templates)(wrong)
        examples.append(example(instruction, input_text,
                                f"The correct spelling is {quote(right)}."))
    return examples


def make_questions(rng):
    instructions = [
        "Turn the following statement into a yes/no question.",
        "Rewrite this sentence as a question.",
        "Change the statement into a question.",
    ]
    pairs = [(f"{capitalize_first(subject)} {aux} {rest}.", f"{capitalize_first(aux)} {subject} {rest}?")
             for subject, aux, rest in AUX_STATEMENTS]
    pairs += DO_STATEMENTS
    return [example(rng.choice(instructions), statement, question) for statement, question in pairs]


def make_word_counts(rng, count=30):
    pool = [f"{capitalize_first(s)} {aux} {rest}." for s, aux, rest in AUX_STATEMENTS]
    pool += [statement for statement, _ in DO_STATEMENTS]
    pool += [text for text, _ in HANDWRITTEN_SENTIMENT]
    instructions = [
        "How many words are in the following sentence?",
        "Count the words in this sentence.",
    ]
    examples = []
    for sentence in rng.sample(pool, count):
        n = len(sentence.split())
        examples.append(example(rng.choice(instructions), sentence,
                                f"The sentence has {n} words."))
    return examples


KINDS = [
    ("unit_conversion", make_unit_conversions),
    ("temperature", make_temperatures),
    ("arithmetic", make_arithmetic),
    ("even_odd", make_even_odd),
    ("compare_numbers", make_compare_numbers),
    ("antonym", make_antonyms),
    ("synonym", make_synonyms),
    ("plural", make_plurals),
    ("past_tense", make_past_tenses),
    ("subject_verb_agreement", make_subject_verb_agreement),
    ("active_to_passive", make_active_to_passive),
    ("definition", make_definitions),
    ("animal_class", make_animal_classes),
    ("sentiment", make_sentiment),
    ("summary", make_summaries),
    ("capital", make_capitals),
    ("rhyme", make_rhymes),
    ("alphabetical_sort", make_alphabetical_sorting),
    ("spelling", make_spelling),
    ("statement_to_question", make_questions),
    ("word_count", make_word_counts),
]


def build_examples(seed=SEED):
    """Return the shuffled list of (kind, example) pairs, in the order they are written."""
    rng = random.Random(seed)
    tagged = []
    for kind, make in KINDS:
        tagged.extend((kind, ex) for ex in make(rng))

    seen = {}
    for kind, ex in tagged:
        if sorted(ex) != ["input", "instruction", "output"] or not all(isinstance(v, str) for v in ex.values()):
            raise ValueError(f"malformed {kind} example {ex!r}: need three string keys")
        key = (ex["instruction"], ex["input"])
        if key in seen:
            raise ValueError(f"duplicate (instruction, input) {key!r} in kinds {seen[key]} and {kind}; "
                             f"change a template or a word list so every prompt is unique")
        seen[key] = kind

    random.Random(seed + 1).shuffle(tagged)
    return tagged


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                        help="folder to write instructions.json into (default: this folder)")
    args = parser.parse_args()

    tagged = build_examples()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, FILENAME)
    text = json.dumps([ex for _, ex in tagged], indent=2, ensure_ascii=False) + "\n"
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)

    counts = Counter(kind for kind, _ in tagged)
    for kind, _ in KINDS:
        print(f"{kind:24s} {counts[kind]:5d}")
    print(f"{'total':24s} {len(tagged):5d}  -> {path}")


if __name__ == "__main__":
    main()
