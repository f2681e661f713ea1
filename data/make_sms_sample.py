"""Generate data/sms_sample.tsv: a small offline stand-in for the SMS Spam Collection.

The file has the same layout as the real SMS Spam Collection TSV, so the same loader reads both:

    Label<TAB>SMS                 <- header line
    ham<TAB>see u at 6?           <- one message per line, label "ham" or "spam"
    spam<TAB>URGENT! You have won ...

Every message is invented for this repository. About half are spam, half ham. Messages come from
two sources so that a classifier cannot separate the classes by template alone:

* templates x fillers (names, places, times, amounts, made-up phone numbers and short codes),
  with a random "texting style" (lower case, "u"/"ur"/"2", dropped punctuation) on some of them;
* about a hundred hand-written standalone messages, including hard cases: ham that talks about
  winning or something being free, and spam written casually.

Texts contain no tabs or newlines (they would break the format); some contain quotes, "&",
HTML-style entities such as "&lt;#&gt;" (as in the real corpus) and non-ASCII characters.
Phone numbers are random digits after a premium-rate-style prefix, and every web address uses a
reserved, non-resolvable top-level domain (.example, .test, .invalid), so none points anywhere.

Determinism: a seeded random.Random builds and shuffles the messages; running the script again
gives a byte-identical file.

    python data/make_sms_sample.py            # writes data/sms_sample.tsv
    python data/make_sms_sample.py --out DIR  # writes DIR/sms_sample.tsv

Written for nanoQLoRA; covered by the project's licence.
"""

import argparse
import os
import random
import re
from collections import Counter

SEED = 2024
FILENAME = "sms_sample.tsv"
HEADER = "Label\tSMS"

# ----------------------------------------------------------------------------------------------
# Fillers

NAMES = [
    "Tom",
    "Priya",
    "José",
    "Zoë",
    "Sam",
    "Aisha",
    "Chloé",
    "Mehmet",
    "Kai",
    "Nia",
    "Björn",
    "Lena",
    "Raj",
    "Ellie",
    "Dan",
    "Fatima",
    "Marco",
    "Siobhán",
    "Jo",
    "Wei",
    "Olu",
    "Gemma",
    "Luca",
    "Hannah",
    "Ravi",
    "Amélie",
    "Kofi",
    "Maya",
    "Ben",
    "Noor",
]
FAMILY = ["Mum", "Dad", "Nan", "Grandad", "sis", "bro", "Auntie Pat", "Uncle Raj"]
PLACES = [
    "the station",
    "the library",
    "the gym",
    "the big Tesco",
    "uni",
    "the café on King St",
    "the bus stop",
    "the cinema",
    "your mum's",
    "the park gates",
    "the office",
    "the pub",
    "the car park",
    "the market",
    "Platform 4",
    "the dentist",
    "Nando's",
    "the chippy",
]
CITIES = [
    "Leeds",
    "Glasgow",
    "Lisbon",
    "Kraków",
    "Dublin",
    "Manchester",
    "Bristol",
    "Cardiff",
    "Málaga",
    "Edinburgh",
    "Berlin",
    "Porto",
]
TIMES = [
    "6",
    "half 6",
    "7",
    "7.30",
    "8",
    "noon",
    "1ish",
    "2pm",
    "quarter past 5",
    "9am",
    "10",
    "after work",
    "lunchtime",
    "11.15",
]
DAYS = ["Monday", "Tuesday", "Wed", "Thursday", "Fri", "Saturday", "Sunday", "tmrw", "tonight", "the weekend"]
ITEMS = [
    "milk",
    "bread",
    "eggs",
    "loo roll",
    "bin bags",
    "a birthday card",
    "ice",
    "batteries",
    "nappies",
    "coffee",
    "some crisps",
    "cat food",
    "bananas",
    "a charger",
]
FOODS = ["pizza", "curry", "Chinese", "fish and chips", "tacos", "pasta", "a roast", "sushi", "burgers", "leftovers"]
ACTIVITIES = [
    "a drink",
    "coffee",
    "the cinema",
    "five-a-side",
    "a walk",
    "the quiz",
    "badminton",
    "lunch",
    "a swim",
    "the gig",
    "pizza",
    "brunch",
]
WORK_THINGS = [
    "report",
    "slides",
    "spreadsheet",
    "timesheet",
    "rota",
    "invoice",
    "essay",
    "lab write-up",
    "budget",
    "presentation",
]
EVENTS = [
    "the wedding",
    "Zoë's party",
    "the beach",
    "graduation",
    "the barbecue",
    "Nan's 80th",
    "the trip",
    "Christmas",
    "the hike",
    "sports day",
]
TOPICS = [
    "the car",
    "Saturday",
    "the flat",
    "Mum's birthday",
    "the holiday",
    "work stuff",
    "the cat",
    "the bills",
    "the kids' school",
    "your sister",
]

AMOUNTS = ["500", "1000", "2000", "1500", "750", "5000", "250", "3000", "900", "10,000"]
PRIZES = [
    "brand new iPhone",
    "£500 shopping voucher",
    "2-week holiday to Florida",
    "Nokia camcorder",
    "£1000 cash award",
    "PS5 console",
    "luxury cruise for 2",
    "50-inch TV",
    "£200 gift card",
    "weekend break in Paris",
]
GADGETS = ["iPad", "games console", "smart watch", "laptop", "pair of wireless earbuds", "camera"]
HOLIDAYS = ["Canary Islands", "Disney", "Ibiza", "New York", "Caribbean", "Tenerife"]
COMPANIES = [
    "Northbank",
    "Crestline Bank",
    "Orbitel Mobile",
    "PayQuick",
    "Streamly",
    "MegaMart",
    "Celltone",
    "RoyalParcel",
    "QuickPost",
    "HMRC Refunds Dept",
]
CLUBS = ["TonesClub", "JokeTXT", "FunZone", "Ringtone World", "GameAlerts", "LuvHoroscopes", "PicOfTheDay", "VIPVideos"]
GIRLS = ["Jess", "Kelly", "Suzi", "Amber", "Dani", "Lucy", "Tasha", "Bella"]
GENRES = ["top 10", "chart", "R&B", "dance", "rock", "classic 90s"]
URL_WORDS = [
    "claim",
    "prize",
    "win",
    "secure",
    "verify",
    "bonus",
    "reward",
    "account",
    "refund",
    "parcel",
    "deal",
    "login",
    "support",
    "update",
]
URL_TLDS = [".example", ".test", ".invalid"]


def phone(rng):
    prefix = rng.choice(["0906", "0907", "0871", "0872", "0905"])
    return prefix + "".join(str(rng.randrange(10)) for _ in range(7))


def shortcode(rng):
    return str(rng.choice([6, 8, 8, 6, 7])) + "".join(str(rng.randrange(10)) for _ in range(4))


def url(rng):
    words = rng.sample(URL_WORDS, 2)
    sep = rng.choice(["-", "", "."])
    path = rng.choice(
        ["", "/c", "/go", "/win", "/" + "".join(rng.choice("abcdefghjkmnpqrstuvwxyz23456789") for _ in range(5))]
    )
    return rng.choice(["www.", "", "http://"]) + sep.join(words) + rng.choice(URL_TLDS) + path


def claim_code(rng):
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return "".join(rng.choice(letters) for _ in range(2)) + str(rng.randint(100, 999))


def postcode(rng):
    return f"PO Box {rng.randint(10, 9999)}, {rng.choice(['W1', 'N1', 'M14', 'LS6', 'EC2', 'BS8'])} {rng.randint(1, 9)}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}"


def price(rng):
    return rng.choice(["150p", "£1.50", "£1", "50p", "25p", "£3", "£2", "£4.50", "10p", "£1.20"])


# Each filler name maps to a function of rng; templates use {name}-style fields.
FILLERS = {
    "name": lambda r: r.choice(NAMES),
    "name2": lambda r: r.choice(NAMES),
    "family": lambda r: r.choice(FAMILY),
    "place": lambda r: r.choice(PLACES),
    "city": lambda r: r.choice(CITIES),
    "time": lambda r: r.choice(TIMES),
    "time2": lambda r: r.choice(TIMES),
    "day": lambda r: r.choice(DAYS),
    "item": lambda r: r.choice(ITEMS),
    "item2": lambda r: r.choice(ITEMS),
    "food": lambda r: r.choice(FOODS),
    "food2": lambda r: r.choice(FOODS),
    "activity": lambda r: r.choice(ACTIVITIES),
    "work": lambda r: r.choice(WORK_THINGS),
    "event": lambda r: r.choice(EVENTS),
    "topic": lambda r: r.choice(TOPICS),
    "n": lambda r: str(r.randint(2, 25)),
    "mins": lambda r: str(r.choice([5, 10, 15, 20, 30, 45])),
    "row": lambda r: r.choice("ABCDEFGHJK"),
    "seat": lambda r: str(r.randint(1, 30)),
    "money": lambda r: str(r.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 60])),
    "amount": lambda r: r.choice(AMOUNTS),
    "prize": lambda r: r.choice(PRIZES),
    "gadget": lambda r: r.choice(GADGETS),
    "holiday": lambda r: r.choice(HOLIDAYS),
    "company": lambda r: r.choice(COMPANIES),
    "club": lambda r: r.choice(CLUBS),
    "girl": lambda r: r.choice(GIRLS),
    "genre": lambda r: r.choice(GENRES),
    "phone": phone,
    "short": shortcode,
    "url": url,
    "code": claim_code,
    "box": postcode,
    "price": price,
    "fee": lambda r: r.choice(["1.99", "2.99", "0.99", "3.49", "1.45"]),
    "pct": lambda r: str(r.choice([60, 70, 75, 80, 85, 90])),
    "small": lambda r: str(r.choice([100, 200, 250, 500])),
    "big": lambda r: str(r.choice([2000, 5000, 10000, 25000])),
    "date": lambda r: f"{r.randint(1, 28)}/{r.randint(1, 12)}",
    "emoji": lambda r: r.choice(["😂", "😅", "🙄", "😘", "👍", "🎉", "❤️", "🙈", "x", "xx", ":)", ":-("]),
}

# ----------------------------------------------------------------------------------------------
# Templates

HAM_TEMPLATES = [
    "Hey {name}, are we still on for {activity} at {time}?",
    "running about {mins} mins late, sorry!! save me a seat",
    "Can you pick up {item} on your way home? We're out",
    "{family} says dinner's at {time}, don't be late again {emoji}",
    "Just landed in {city}. Will call when I get to the hotel",
    "Ok I'll meet you outside {place} at {time}",
    "Happy birthday {name}!! Hope you have an amazing day {emoji}",
    "lol that's exactly what {name} said yesterday",
    "Can't talk now, in a meeting. Call you back in {mins}",
    "Thanks for the lift earlier {name}, owe you one",
    "The plumber's coming {day} between {time} and {time2}, can you be home?",
    "Have you finished the {work}? {name} is asking",
    "I'm at {place}, where are you?",
    "Don't forget {name}'s party on {day}. Can you bring {item}?",
    "Ok cool. See you {day} then {emoji}",
    "Got us tickets for {day}! Row {row}, seat {seat} onwards {emoji}",
    "Feeling rubbish today, think I'm coming down with something. Staying in",
    "Can you send me the photos from {event}?",
    "We need {n} more chairs for {day}, can {name} bring some?",
    "Train's cancelled again {emoji} getting the bus, home by {time}",
    "Meeting moved to {time}, room {n}. Please bring the {work}",
    "Just put the kettle on, want a cuppa?",
    "Reminder: dentist at {time} on {day}",
    "Bought the last {item} in the shop, you're welcome {emoji}",
    "Text me when you get home safe {emoji}",
    "I've left the keys under the mat. Back around {time}",
    "Shall we do {food} tonight or {food2}?",
    "Sorry I missed your call, was driving. Everything ok?",
    "{name} just passed her driving test!!!",
    "Can we move our catch up to {day}? Something came up at work",
    "Who's got my charger? Been missing since {day}",
    "Hiya, just checking you got the £{money} I sent for {event}",
    "Won the quiz tonight!! Beat {name}'s team by {n} points {emoji}",
    "Free {day}? Fancy {activity}?",
    "The gym's doing a free trial week, wanna come with me {day}?",
    "Call me when you can, it's about {topic}, nothing urgent",
    "Ok. I'm at home now. &lt;#&gt; mins to get to {place}",
    "They're about &lt;#&gt; quid each, still want one?",
    'The kids say "hi" & want to know when you\'re visiting',
    "Did you read {name}'s email? \"all hands at {time}\"... what's that about",
    "Yeah {time} works for me. {place}?",
    "Are you coming to {event} or not? Need numbers by {day}",
    "Don't worry about it, honestly. We'll sort it {day}",
    "Got {food} in the oven, be ready in {mins}",
    "{family} wants to know if you're coming for Sunday lunch",
    "Just saw {name} at {place}, she says hi",
    "Can I borrow your {item2}? Mine's broken",
    "Parcel came for you, I put it in your room",
    "Sorry, fell asleep on the sofa {emoji} what did I miss?",
    "Traffic is mad on the ring road. Gonna be {mins} late",
    "Mum, can you transfer me £{money} for the train? Will pay you back {day}",
    "Well done on the {work}!! {name} said it was brilliant",
    "No worries, take your time x",
    "Are you watching this?? {name} is on TV!!",
    "Heading to {place} now. Want anything?",
]

SPAM_TEMPLATES = [
    "URGENT - our records show a £{amount} payout is reserved for this number. Ring {phone} to release it. T&Cs apply. {price}/min",
    "Congratulations! You have been selected to receive a {prize}. Reply YES to {short} to claim. Std msg rates apply",
    "FREE ringtone! Text TONE to {short} to get {genre} hits sent to your phone. {price}/wk, 16+. Send STOP to end",
    "Your {company} account has been suspended. Verify your details at {url} within 24 hrs to avoid closure",
    "Need cash fast? Loans from £{small} to £{big}, no credit checks. Text LOAN to {short}",
    "Hi it's {girl} 😘 I'm lonely tonight, want to chat? Call me on {phone} ({price}/min)",
    "You have 1 unclaimed voucher worth £{amount}. Claim at {url} before {date}",
    "Final notice: we've tried to contact you about your £{amount} reward. Call {phone} from a landline. {box}",
    "Your parcel could not be delivered. Pay the £{fee} redelivery fee at {url}",
    "Win a {gadget}! Just answer: what colour is the sky? Text BLUE to {short}. {price}/msg",
    "You've been chosen for a FREE {holiday} holiday! Call {phone} to book. Over 18s only",
    "Dear customer, your {company} bill is overdue. To avoid disconnection pay now: {url}",
    "IMPORTANT: unusual sign-in detected on your {company} account. Confirm your password at {url}",
    "hey u!! its {girl} from the other night, got pics 4 u ;) txt PIC 2 {short} 2 see em. {price}/msg",
    "Thanks for subscribing to {club}! You will be charged {price} per week. To cancel reply STOP",
    "Tax refund of £{amount} is pending. Complete the form at {url} to receive payment",
    "No catch!! Pick £{amount} cash or a {prize} - ur choice. Just call {phone}. Calls cost {price}/min",
    "Your number was drawn in our weekly lottery. Prize: £{amount}. Claim code {code}. Call {phone}",
    "Want to meet singles in {city}? Text DATE to {short}. 18+ {price}/msg",
    "WINNER NOTICE: a {prize} has been set aside for you. Collect by calling {phone} today",
    "Debt problems? Write off up to {pct}% of what you owe with a new government scheme. Reply INFO",
    "Loyalty update: you have {n}00 reward points about to expire! Swap them for cash, call {phone}, ref {code}",
    "You've been awarded a £{amount} gift card! Tap {url} & enter code {code}",
    "hey is this still ur number? got a free £{money} credit for u, just reply YES lol",
    "Mate you've gotta see this, I made £{amount} in a week from home {url}",
    "Did u get my msg? Ur package is waiting, just pay £{fee} here {url}",
    "{club}: your FREE trial has ended. You'll now be billed {price}/day. Text STOP to {short} to cancel",
    "Your {company} card has been locked due to suspicious activity. Unlock it here: {url}",
    "Claim your FREE {gadget} today! Limited stock. Reply CLAIM to {short}",
    "Ur entry into our £{amount} prize draw is confirmed! To get ur prize call {phone} now",
    "Pre-approved! Borrow up to £{big} today, funds in minutes. Apply: {url}",
    "{girl} has sent you a private message! To read it call {phone}. {price}/min",
    "Dear {company} user, your mailbox is full. Log in at {url} to keep receiving messages",
    "Last chance to claim your {prize}!! Call {phone} b4 midnight. {box}",
    "Get {genre} ringtones + wallpapers FREE for a week! Text GO to {short}, then {price}/wk",
    "We owe you £{amount} from mis-sold insurance. Reply YES for a free claims check",
    "Congrats! Ur no. was picked 4 a £{amount} bonus. Call {phone} quoting {code}. 18+",
    "Hot local girls want 2 chat NOW 😍 Text HOT to {short}. {price}/msg",
    "Your {company} delivery is on hold: address incomplete. Update it at {url}",
    "FINAL ATTEMPT: your £{amount} prize expires {date}. Call {phone} (landline {price}/min)",
    "Well done! Your phone number came top in our survey and wins a {prize}. Text WIN to {short}",
]

# Hand-written standalone messages: (label, text).
HANDWRITTEN = [
    ("ham", "Lol no I'm not coming, I'm in my pyjamas already"),
    ("ham", "Did you remember to put the bins out?"),
    ("ham", "Ok"),
    ("ham", "k see u there"),
    ("ham", "Omg the cat has just brought a live frog into the kitchen 😱"),
    ("ham", "What time does your flight land? I'll come get you"),
    ("ham", "Sorry, can't make it tonight. Rain check?"),
    ("ham", "Tell Grandad happy birthday from me, I'll ring him later"),
    ("ham", "The Wi-Fi password is on the fridge, it's the long one"),
    ("ham", "Just got your message, yeah that's fine"),
    ("ham", "haha you wish"),
    ("ham", "I won the raffle at work! A hamper full of cheese, who wants some?"),
    ("ham", "Bus is free today because of the strike, jump on if you need to"),
    ("ham", "You free to chat later? Need advice about the job offer"),
    ("ham", "We won!!! 3-1, Kai scored twice"),
    ("ham", "Call me back when you get this, no rush"),
    ("ham", "Prize for the worst joke goes to your dad again 😂"),
    ("ham", "Where did you put the spare key?"),
    ("ham", "Don't forget your PE kit tomorrow"),
    ("ham", "Booked the table for 8, under my name"),
    ("ham", 'He said "we\'ll see" which means no lol'),
    ("ham", "Mum's making her famous lasagne, come round at 7"),
    ("ham", "I'm so tired I could sleep for a week"),
    ("ham", "Can you feed the fish while I'm away? Just a pinch each morning"),
    ("ham", "Cheers for yesterday, had a great time"),
    ("ham", "Have a safe trip! Send pics of the mountains"),
    ("ham", "Running late, start without me"),
    ("ham", "Happy anniversary you two ❤️"),
    ("ham", "Bring a jumper, it gets cold by the lake at night"),
    ("ham", "Nope. Not a chance. Ask your dad"),
    ("ham", "Just seen the score, gutted for you"),
    ("ham", "The doctor says it's only a sprain, phew"),
    ("ham", "Did you get the job?? Tell me everything"),
    ("ham", "lemme know when ur outside, the buzzer's broken"),
    ("ham", "Who ate my yoghurt? It had my name on it!"),
    ("ham", "I'll be at the back of the hall, near the exit"),
    ("ham", "Thanks so much for the flowers, they're beautiful"),
    ("ham", "Crème brûlée or cheesecake for pudding on Sunday?"),
    ("ham", "Hola! We're back from Seville, tanned and broke 😅"),
    ("ham", "Is Noémie still coming to stay next week?"),
    ("ham", "The quiz answer was Canberra, I told you!"),
    ("ham", "Leave some hot water for me pls"),
    ("ham", "Sorry wrong number!"),
    ("ham", "Good luck for your exam tomorrow, you've got this"),
    ("ham", "Got home fine, thanks for dinner x"),
    ("ham", "Can't find my glasses. Are they in your car?"),
    ("ham", "Reminder that it's non-uniform day on Friday, £1 for charity"),
    ("ham", "I've got a free ticket for the match on Saturday if you want it"),
    ("ham", "Ur a legend, thank u"),
    ("ham", "Went past the old house today, they've painted the door yellow"),
    ("ham", "Fish & chips on the beach? I'll bring the ketchup"),
    ("ham", "She got in to uni!! First choice!!"),
    ("ham", "Meet at the usual place? &lt;TIME&gt; works for me"),
    ("ham", "Baby's finally asleep. Don't ring the doorbell 🙏"),
    ("ham", "I'm outside, the blue car"),
    ("ham", "Are u still up?"),
    ("ham", "Dad fixed the boiler himself, only flooded the kitchen a little"),
    (
        "spam",
        "Lucky Draw Result: mobile ending in your number took 2nd place - £1,250 unclaimed. Ring 09061457703 b4 Fri. 150p/min",
    ),
    ("spam", "FunTXT: text PICS to 84127 for 3 free phone wallpapers a week, then £1.50 each. Help? 08712 440391"),
    (
        "spam",
        "Your bank account will be closed today unless you confirm your details: http://secure-login.invalid/verify",
    ),
    ("spam", "hiya its Roxy 💋 stuck in on my own & bored. ring me on 09058812644 for a proper chat xx £1.50/min"),
    ("spam", "Reminder: a £750 prize is still waiting in your name. Call 08712402961 today, ref code XK77"),
    ("spam", "ur TuneBox ringtone plan is now active. £4.50/wk until u text STOP to 88039"),
    ("spam", "Were you hurt in a car accident that wasn't your fault? You could be owed £2,400. Reply CLAIM"),
    (
        "spam",
        "Spin & win: every txt gives u a chance at £50-£5000 in our daily jackpot! Send SPIN to 87575. £1.50/day, 16+",
    ),
    (
        "spam",
        "Hi, this is the fraud team. A payment of £899 was attempted on your card. If this wasn't you reply NO and call 0871 622 9481",
    ),
    ("spam", "Someone has a crush on u 😍 and wants u 2 know! Find out who by calling 09065171142 now. Calls 60p/min"),
    ("spam", "Want a new phone for FREE? Upgrade today with Orbitel. Text UPGRADE to 69966, no contract checks"),
    ("spam", "omg have u seen this?? u're in this video lol {url}"),
    ("spam", "Your Streamly payment failed. Update your billing info within 48 hours: www.streamly-billing.example"),
    ("spam", "Last minute deal! 7 nights in Tenerife for only £99pp. Call 09064019788 to book now. Calls £1/min"),
    (
        "spam",
        "Hello dear, I am a lawyer representing a late client who shares your surname. Reply for details of a $4.5m inheritance",
    ),
    ("spam", "Lonely tonight? 100s of real singles near you are online NOW. Txt MEET to 69888. 18+ £3/msg"),
    ("spam", "We tried to deliver your parcel today. Reschedule here: www.royalparcel-redelivery.test (£1.45 fee)"),
    ("spam", "Urgent! Your car insurance expires today. Reply RENEW to get a quote 50% cheaper"),
    ("spam", "Footy fans! Win 2 tickets to the cup final - just text GOAL to 87121 and answer 1 easy question. £1/txt"),
    (
        "spam",
        "Half price line rental for 12 months + unlimited texts! Reply YES for ur free upgrade or call 08000839402",
    ),
    ("spam", "Cashback alert: £150 has been credited to your account. Confirm at www.bonus.reward.example to release"),
    ("spam", "Hey it's Mike from the gym 😊 found a crazy investment, turned £200 into £4k. DM me or go to {url}"),
    ("spam", "Your mobile number has been selected for a £5000 loan at 0% interest. Text YES to 61105"),
    ("spam", "Dont miss out!! 400 bonus minutes + a free handset when u switch today. Call 08002888812"),
    ("spam", "Quiz time! Name the capital of France & u could win a tablet! Txt ur answer to 82277. £1.50 per entry"),
    (
        "spam",
        "As a valued customer, you've been chosen for a 12-month FREE magazine subscription. Just pay £2.99 p&p at {url}",
    ),
    (
        "spam",
        "An old friend has left you a voice message on our dating line! To hear it call 09058097218 from a landline",
    ),
    ("spam", "Tired of being broke? Earn £300/day working from home. No experience needed. Reply START"),
    (
        "spam",
        "ALERT: Your PayQuick ID has been used on a new device. If this wasn't you secure your account &gt;&gt; {url}",
    ),
    ("spam", "Ur weekly horoscope is ready! Txt STAR to 85023 to read it. £1/msg. Unsubscribe? txt STOP"),
    ("spam", 'Hi! U\'ve been picked 4 our exclusive "Mystery Box" - worth up to £1000! Just £4.99 to open: {url}'),
    (
        "spam",
        "This is your final warning. A lawsuit has been filed against you over unpaid tax. Call 0872 344 1265 immediately",
    ),
    ("spam", "We have been trying to reach you about your car's extended warranty. Press 1 or call 08719181513"),
    ("spam", "New chart tones every Monday!! 1st one on us, then £3/wk. Txt TUNES to 89693"),
    ("spam", "Hey! Your friend Sam has sent you a £50 voucher 🎁 Tap to accept: {url}"),
    ("spam", "Café Olé 2-4-1 deal: show this text for free coffee!! Join the VIP club, text CAFE to 65432, £2/wk"),
    ("spam", "Adult content alert: unlock 18+ clips straight 2 ur phone. Txt VIP to 69696. £4.50/wk, 18+ only"),
    ("spam", "lol forgot 2 tell u, u won that comp we entered! just need ur bank details 2 send the £800 x"),
    (
        "spam",
        "Important information for Crestline Bank customers: a new security update is required. Log in now: {url}",
    ),
    ("spam", "Hi mum, this is my new number, phone broke. Can u send £250 for a bill? will explain later x"),
    ("spam", "Good news! You qualify for a free energy-saving boiler under a new scheme. Reply BOILER to check"),
    ("spam", "Your Celltone SIM will be deactivated in 24 hrs. To keep your number verify here: {url}"),
    ("spam", "Exclusive: 3 free bets worth £30 when u join BetBlast today! Txt BET to 60606. 18+ T&Cs"),
    ("spam", "Congratulations, you are today's 1,000,000th visitor! Claim your reward now: {url}"),
    ("spam", "Fancy a chat with a mature lady tonight? Call Jackie on 09057039994. £1.80/min 18+"),
]

# ----------------------------------------------------------------------------------------------
# Texting style: applied to some template messages so the two classes overlap in surface form.

TEXTING_SWAPS = [
    (r"\byou\b", "u"),
    (r"\byour\b", "ur"),
    (r"\bare\b", "r"),
    (r"\bto\b", "2"),
    (r"\bfor\b", "4"),
    (r"\bplease\b", "pls"),
    (r"\btomorrow\b", "tmrw"),
    (r"\bthanks\b", "thx"),
    (r"\bbefore\b", "b4"),
    (r"\bgoing to\b", "gonna"),
]


def texting_style(text, rng):
    if rng.random() < 0.5:
        for pattern, short in TEXTING_SWAPS:
            if rng.random() < 0.7:
                text = re.sub(pattern, short, text, flags=re.IGNORECASE)
    if rng.random() < 0.4:
        text = text.lower()
    if rng.random() < 0.3:
        text = text.rstrip(".!?")
    return text


def fill(template, rng):
    fields = re.findall(r"{(\w+)}", template)
    values = {}
    for field in fields:
        if field not in FILLERS:
            raise ValueError(f"template {template!r} uses unknown field {{{field}}}; add it to FILLERS")
        values[field] = FILLERS[field](rng)
    return template.format(**values)


def from_templates(templates, target, rng, styled_fraction):
    """Round-robin over the templates until `target` distinct messages exist."""
    messages, seen = [], set()
    attempts = 0
    while len(messages) < target:
        template = templates[attempts % len(templates)]
        attempts += 1
        if attempts > 50 * target:
            raise RuntimeError(
                f"could only make {len(messages)} distinct messages of {target}; add templates or fillers"
            )
        text = fill(template, rng)
        if rng.random() < styled_fraction:
            text = texting_style(text, rng)
        if text not in seen:
            seen.add(text)
            messages.append(text)
    return messages


def build_messages(seed=SEED, per_class=300):
    """Return the shuffled list of (label, text) pairs, in the order they are written."""
    rng = random.Random(seed)
    handwritten = [(label, fill(text, rng)) for label, text in HANDWRITTEN]
    counts = Counter(label for label, _ in handwritten)
    rows = list(handwritten)
    rows += [("ham", t) for t in from_templates(HAM_TEMPLATES, per_class - counts["ham"], rng, 0.45)]
    rows += [("spam", t) for t in from_templates(SPAM_TEMPLATES, per_class - counts["spam"], rng, 0.2)]

    seen = set()
    for label, text in rows:
        if label not in ("ham", "spam"):
            raise ValueError(f"bad label {label!r} for {text!r}: use 'ham' or 'spam'")
        if "\t" in text or "\n" in text or "\r" in text or not text.strip():
            raise ValueError(f"message {text!r} is empty or contains a tab/newline, which breaks the TSV")
        if text in seen:
            raise ValueError(f"duplicate message {text!r}")
        seen.add(text)

    random.Random(seed + 1).shuffle(rows)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=os.path.dirname(os.path.abspath(__file__)),
        help="folder to write sms_sample.tsv into (default: this folder)",
    )
    args = parser.parse_args()

    rows = build_messages()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, FILENAME)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(HEADER + "\n")
        for label, text in rows:
            f.write(f"{label}\t{text}\n")

    counts = Counter(label for label, _ in rows)
    print(f"ham  {counts['ham']:5d}\nspam {counts['spam']:5d}\ntotal {len(rows):4d}  -> {path}")


if __name__ == "__main__":
    main()
