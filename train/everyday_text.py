"""Sentence frames of everyday speech for the open-vocabulary training text (train/open_text.py).

Random word runs teach the demo model to spell what it hears, but not how words follow each
other in speech; most of its English errors were word boundaries ("offone") and spellings of
words it had heard. These frames give it word order: requests, questions and statements about
time, places, work, family, travel, shopping, food, health, weather, with their slots filled
from small hand-written lists of the right kind (verb phrases, things, places, people, times,
adjectives) and, in noun-ish and "mention" slots, from the frequency-ranked wordfreq words that
open_text.py draws, so that the large vocabulary is also heard inside real sentence contexts.

No part-of-speech tagger: a wordfreq word goes only where any word fits ("what does {W} mean",
"how do you spell {W}"), or, in noun slots, when its suffix says it is a noun ("-tion",
"-ment", ...).

A frame is a string with slots in braces: `{N}` a thing, `{VP}` a verb phrase in its base form,
`{VPD}` the same in the past, `{VPG}` in -ing form, ... (FILLERS names them all). Hindi frames
avoid slots whose words would have to agree in gender with another slot.
"""

from __future__ import annotations

import random
import re
from typing import Callable

SLOT = re.compile(r"\{([A-Z]+)\}")

# --------------------------------------------------------------------------------------------
# English
# --------------------------------------------------------------------------------------------

# third person, past, -ing of every verb that starts a verb phrase below (spelled out: a rule
# would teach "stoped" or "runing")
EN_VERB_FORMS = {
    "answer": ("answers", "answered", "answering"), "ask": ("asks", "asked", "asking"),
    "book": ("books", "booked", "booking"), "bring": ("brings", "brought", "bringing"),
    "buy": ("buys", "bought", "buying"), "call": ("calls", "called", "calling"),
    "cancel": ("cancels", "cancelled", "cancelling"), "carry": ("carries", "carried", "carrying"),
    "catch": ("catches", "caught", "catching"), "change": ("changes", "changed", "changing"),
    "check": ("checks", "checked", "checking"), "clean": ("cleans", "cleaned", "cleaning"),
    "close": ("closes", "closed", "closing"), "cook": ("cooks", "cooked", "cooking"),
    "drink": ("drinks", "drank", "drinking"), "drive": ("drives", "drove", "driving"),
    "eat": ("eats", "ate", "eating"), "feed": ("feeds", "fed", "feeding"),
    "fill": ("fills", "filled", "filling"), "find": ("finds", "found", "finding"),
    "finish": ("finishes", "finished", "finishing"), "fix": ("fixes", "fixed", "fixing"),
    "get": ("gets", "got", "getting"), "give": ("gives", "gave", "giving"),
    "go": ("goes", "went", "going"), "have": ("has", "had", "having"),
    "help": ("helps", "helped", "helping"), "keep": ("keeps", "kept", "keeping"),
    "leave": ("leaves", "left", "leaving"), "lock": ("locks", "locked", "locking"),
    "look": ("looks", "looked", "looking"), "make": ("makes", "made", "making"),
    "meet": ("meets", "met", "meeting"), "move": ("moves", "moved", "moving"),
    "open": ("opens", "opened", "opening"), "order": ("orders", "ordered", "ordering"),
    "pack": ("packs", "packed", "packing"), "paint": ("paints", "painted", "painting"),
    "pay": ("pays", "paid", "paying"), "pick": ("picks", "picked", "picking"),
    "plan": ("plans", "planned", "planning"), "play": ("plays", "played", "playing"),
    "print": ("prints", "printed", "printing"), "put": ("puts", "put", "putting"),
    "read": ("reads", "read", "reading"), "repair": ("repairs", "repaired", "repairing"),
    "return": ("returns", "returned", "returning"), "ride": ("rides", "rode", "riding"),
    "run": ("runs", "ran", "running"), "send": ("sends", "sent", "sending"),
    "sell": ("sells", "sold", "selling"), "show": ("shows", "showed", "showing"),
    "sign": ("signs", "signed", "signing"), "sit": ("sits", "sat", "sitting"),
    "start": ("starts", "started", "starting"), "stay": ("stays", "stayed", "staying"),
    "stop": ("stops", "stopped", "stopping"), "take": ("takes", "took", "taking"),
    "talk": ("talks", "talked", "talking"), "teach": ("teaches", "taught", "teaching"),
    "tell": ("tells", "told", "telling"), "throw": ("throws", "threw", "throwing"),
    "turn": ("turns", "turned", "turning"), "visit": ("visits", "visited", "visiting"),
    "wait": ("waits", "waited", "waiting"), "wake": ("wakes", "woke", "waking"),
    "walk": ("walks", "walked", "walking"), "wash": ("washes", "washed", "washing"),
    "watch": ("watches", "watched", "watching"), "water": ("waters", "watered", "watering"),
    "wear": ("wears", "wore", "wearing"), "write": ("writes", "wrote", "writing"),
    "borrow": ("borrows", "borrowed", "borrowing"), "lend": ("lends", "lent", "lending"),
    "charge": ("charges", "charged", "charging"), "download": ("downloads", "downloaded", "downloading"),
    "upload": ("uploads", "uploaded", "uploading"), "save": ("saves", "saved", "saving"),
    "try": ("tries", "tried", "trying"), "use": ("uses", "used", "using"),
    "want": ("wants", "wanted", "wanting"), "need": ("needs", "needed", "needing"),
    "like": ("likes", "liked", "liking"), "love": ("loves", "loved", "loving"),
    "lose": ("loses", "lost", "losing"), "forget": ("forgets", "forgot", "forgetting"),
    "remember": ("remembers", "remembered", "remembering"), "see": ("sees", "saw", "seeing"),
    "hear": ("hears", "heard", "hearing"), "fold": ("folds", "folded", "folding"),
    "iron": ("irons", "ironed", "ironing"), "sweep": ("sweeps", "swept", "sweeping"),
    "boil": ("boils", "boiled", "boiling"), "bake": ("bakes", "baked", "baking"),
    "cut": ("cuts", "cut", "cutting"), "hang": ("hangs", "hung", "hanging"),
    "join": ("joins", "joined", "joining"), "practice": ("practices", "practiced", "practicing"),
    "study": ("studies", "studied", "studying"), "swim": ("swims", "swam", "swimming"),
    "sleep": ("sleeps", "slept", "sleeping"), "rest": ("rests", "rested", "resting"),
    "shop": ("shops", "shopped", "shopping"), "queue": ("queues", "queued", "queuing"),
    "fly": ("flies", "flew", "flying"), "park": ("parks", "parked", "parking"),
    "reply": ("replies", "replied", "replying"), "email": ("emails", "emailed", "emailing"),
    "text": ("texts", "texted", "texting"), "update": ("updates", "updated", "updating"),
    "review": ("reviews", "reviewed", "reviewing"), "prepare": ("prepares", "prepared", "preparing"),
    "share": ("shares", "shared", "sharing"), "test": ("tests", "tested", "testing"),
    "count": ("counts", "counted", "counting"), "collect": ("collects", "collected", "collecting"),
    "deliver": ("delivers", "delivered", "delivering"), "fetch": ("fetches", "fetched", "fetching"),
}

# verb phrases of daily life, base form first (the first word is the verb)
EN_VERB_PHRASES = """
go for a walk|go to bed early|go to the gym|go shopping|go home|go to work|go to school
eat lunch|eat dinner together|eat something light|have breakfast|have a shower|have a quick look
make a cup of tea|make coffee|make dinner|make a list|make an appointment|make a phone call
take a break|take the bus|take a taxi|take the train|take some photos|take the dog out|take a day off
call my mother|call the doctor|call a plumber|call them back|call the bank|call you later
send an email|send the invoice|send a message|send the photos|send the parcel|send a reminder
buy some groceries|buy a new phone|buy tickets|buy a present|buy fresh vegetables|buy a bottle of water
pay the rent|pay the bill|pay by card|pay in cash|pay the electricity bill|pay for parking
check the schedule|check my email|check the weather|check the oil|check the address|check the price
clean the kitchen|clean the windows|clean my room|clean the car|clean the bathroom
open the window|open the door|open the box|open an account|open the file
close the door|close the curtains|close the shop|close the laptop
fix the sink|fix the printer|fix the bike|fix the roof|fix the light
book a table|book a flight|book a room|book a doctor's appointment|book the tickets
watch a movie|watch the news|watch the match|watch the children
wash the dishes|wash the car|wash my hands|wash the clothes
cook rice|cook some pasta|cook for the family|cook a simple meal
read the newspaper|read a book|read the instructions|read the contract
write a letter|write the report|write a short note|write down the number
meet a friend|meet the manager|meet my cousin|meet the new neighbours
visit my grandparents|visit the museum|visit the dentist|visit a friend in hospital
wait for the bus|wait outside|wait a few minutes|wait in the car
walk the dog|walk to the station|walk home|walk around the lake
play football|play the guitar|play cards|play with the kids|play chess
start the meeting|start the car|start a new job|start dinner|start the washing machine
finish the project|finish my homework|finish the painting|finish work early
help my father|help the children with homework|help you carry that|help with the cleaning
bring an umbrella|bring some snacks|bring the documents|bring your passport|bring a jacket
get some sleep|get a haircut|get the car washed|get some fresh air|get a new passport
find my keys|find a parking space|find a good doctor|find the remote|find a cheaper flight
keep the change|keep the receipt|keep the door closed|keep it warm
leave the keys on the table|leave early|leave a message|leave the lights on
look for a new flat|look after the baby|look at the map|look for my glasses
move the table|move to a new city|move the car|move the meeting
order a pizza|order some food|order a taxi|order new shoes
pack my bag|pack the suitcase|pack some lunch
pick up the kids|pick up the parcel|pick up some milk|pick a date
plan the trip|plan the weekend|plan a party|plan the budget
print the tickets|print the form|print two copies
put the milk in the fridge|put the kettle on|put on a jacket|put the books away
return the books|return the shoes|return the call
ride a bike|ride the bus
run in the park|run a few errands|run late
sell the old car|sell some furniture
show you the way|show me the photos|show your ticket
sign the form|sign the contract|sign here
sit by the window|sit down for a minute|sit in the garden
stay at home|stay in a hotel|stay a little longer|stay with my aunt
stop at the shop|stop the car here|stop working late
talk to the teacher|talk to my boss|talk about the plan|talk to the landlord
tell the truth|tell my sister|tell them about the change
throw away the rubbish|throw the ball
turn off the lights|turn on the heater|turn left at the corner|turn down the music|turn right after the bridge
wake up early|wake the children
wear a coat|wear comfortable shoes
water the plants|water the garden
borrow a pen|borrow your car|borrow some money
lend you my umbrella|lend him a hand
charge my phone|charge the battery
download the app|download the form|upload the photos|upload the document
save some money|save the file|save a seat for me
try the soup|try again later|try a different route
use the stairs|use the other door|use my card
lose weight|lose my wallet|forget my password|forget the keys
remember the password|remember to lock the door
fold the laundry|iron my shirt|sweep the floor|boil some water|bake a cake|cut the grass|cut the bread
hang the washing out|join the team|join a club|practice the piano|study for the exam|swim in the sea
sleep for an hour|rest for a while|shop online|queue at the counter|fly to the coast|park the car
reply to the message|email the teacher|text my brother|update the calendar|review the notes
prepare the presentation|share the document|test the new version|count the money|collect the tickets
deliver the package|fetch some water|feed the cat|fill the tank|fill in the form|lock the door
drive to work|drive slowly|drink some water|drink more water|catch the last train|carry the shopping
change the sheets|change the password|change trains|answer the phone|answer the question
ask for directions|ask the waiter|cancel the order|cancel my subscription|repair the fence
paint the bedroom|teach the kids|see the doctor|hear the news|need a rest|want a coffee
like the new design|love this song
""".split("|")
EN_VERB_PHRASES = [p.strip() for line in EN_VERB_PHRASES for p in line.split("\n") if p.strip()]

EN_THINGS = """
phone key wallet bag umbrella ticket passport laptop charger book pen letter parcel box bottle
jacket coat shirt dress hat scarf glove shoe sock watch ring camera map receipt invoice form
chair table sofa bed lamp mirror door window fridge oven kettle cup glass plate bowl spoon fork
knife towel blanket pillow printer screen keyboard mouse remote radio television clock calendar
bike car bus train taxi plane seat suitcase card envelope stamp magazine newspaper
bill cheque contract report file folder list note message email photo picture poster present
medicine bandage prescription toothbrush soap shampoo battery bulb candle basket bucket ladder
hammer brush sponge tap sink shower heater fan curtain carpet mat plant vase
""".split()

# (singular, plural) where the plural is not the singular plus s
EN_PLURAL = {"box": "boxes", "glass": "glasses", "knife": "knives", "brush": "brushes", "watch": "watches",
             "dress": "dresses", "bus": "buses", "battery": "batteries", "sandwich": "sandwiches",
             "child": "children", "person": "people", "tomato": "tomatoes", "potato": "potatoes",
             "peach": "peaches", "cherry": "cherries", "strawberry": "strawberries", "dish": "dishes",
             "lunch": "lunches", "class": "classes", "city": "cities", "country": "countries",
             "party": "parties", "family": "families", "baby": "babies", "address": "addresses"}

EN_ITEMS = """
milk|bread|eggs|butter|cheese|rice|flour|sugar|salt|pepper|tea|coffee|juice|water|apples|bananas|oranges|grapes
tomatoes|potatoes|onions|carrots|garlic|lemons|chicken|fish|beans|lentils|pasta|noodles|soup|yoghurt
cereal|honey|jam|oil|biscuits|chocolate|ice cream|spinach|cabbage|peas|mangoes|cucumbers|a loaf of bread
a dozen eggs|a bag of rice|a bottle of milk|a packet of tea|some vegetables|some fruit|toilet paper
washing powder|dish soap|toothpaste|batteries|light bulbs|paper towels
""".replace("\n", "|").split("|")
EN_ITEMS = [x.strip() for x in EN_ITEMS if x.strip()]

EN_MEALS = ["breakfast", "lunch", "dinner", "supper", "a snack", "brunch", "dessert"]
EN_DISHES = ["soup", "salad", "curry", "pizza", "pasta", "fried rice", "noodles", "a sandwich",
             "grilled fish", "roast chicken", "vegetable stew", "dal and rice", "pancakes", "an omelette",
             "a burger", "fresh bread", "chicken curry", "fish and chips", "tomato soup", "a cheese sandwich"]

EN_PLACES = """
the station|the bus stop|the airport|the bank|the post office|the market|the supermarket|the pharmacy
the hospital|the clinic|the library|the museum|the park|the beach|the office|the school|the university
the cinema|the theatre|the restaurant|the cafe|the hotel|the gym|the swimming pool|the garage
the petrol station|the bakery|the butcher's|the hairdresser's|the dentist|the city centre|the town hall
the police station|the mall|the car park|the train station|the ticket office|the reception|the kitchen
the living room|the bedroom|the bathroom|the garden|the balcony|the corner shop|the main road
the first floor|the second floor|the basement|the lift|the front door|the back door|the village
my office|my house|your place|their house|the new flat|the old bridge|the river|the hills|the farm
""".replace("\n", "|").split("|")
EN_PLACES = [x.strip() for x in EN_PLACES if x.strip()]

EN_CITIES = ["london", "paris", "delhi", "mumbai", "new york", "tokyo", "berlin", "madrid", "rome", "dubai",
             "sydney", "toronto", "chicago", "boston", "bangalore", "chennai", "kolkata", "jaipur", "singapore",
             "bangkok", "cairo", "nairobi", "lisbon", "dublin", "edinburgh", "manchester", "amsterdam",
             "vienna", "prague", "istanbul", "seoul", "beijing", "moscow", "mexico city", "lima", "oslo"]

EN_PEOPLE = """
my mother|my father|my sister|my brother|my wife|my husband|my son|my daughter|my grandmother
my grandfather|my uncle|my aunt|my cousin|my friend|my neighbour|my boss|my colleague|my teacher
the doctor|the nurse|the driver|the manager|the waiter|the teacher|the landlord|the plumber|the postman
the children|the kids|the baby|our guests|the new student|your brother|your mother|her husband
his wife|their son|our neighbours|the team|everyone|nobody|somebody|the customer|the shopkeeper
""".replace("\n", "|").split("|")
EN_PEOPLE = [x.strip() for x in EN_PEOPLE if x.strip()]

EN_NAMES = ["john", "mary", "david", "sarah", "peter", "anna", "james", "emma", "michael", "lucy", "tom",
            "kate", "daniel", "laura", "paul", "sophie", "ravi", "priya", "amit", "neha", "rahul", "anita",
            "sam", "alex", "maria", "carlos", "chen", "li", "omar", "fatima", "ben", "grace", "jack", "ella"]

EN_JOBS = ["a teacher", "a nurse", "a doctor", "an engineer", "a driver", "a cook", "a farmer", "a lawyer",
           "an accountant", "a student", "a designer", "a programmer", "a shop assistant", "a pilot",
           "a waiter", "an electrician", "a journalist", "a manager", "a cleaner", "a mechanic"]

EN_TIMES = """
today|tomorrow|tonight|this morning|this afternoon|this evening|tomorrow morning|tomorrow night
next week|next month|next year|last week|last night|yesterday|yesterday morning|on the weekend
this weekend|in the morning|in the evening|after lunch|before dinner|after work|before work|right now
in a minute|in five minutes|in ten minutes|in half an hour|in an hour|in two hours|later today
soon|every day|every morning|every week|once a week|twice a day|at the weekend|at lunchtime|at midnight
at noon|early tomorrow|the day after tomorrow|the day before yesterday|later|next time|at the end of the month
""".replace("\n", "|").split("|")
EN_TIMES = [x.strip() for x in EN_TIMES if x.strip()]

EN_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
EN_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
             "october", "november", "december"]

EN_ADJ = """
ready|late|early|busy|free|tired|hungry|thirsty|cold|hot|warm|wet|dry|clean|dirty|broken|empty|full
open|closed|expensive|cheap|new|old|heavy|light|quiet|noisy|crowded|far|near|easy|difficult
important|urgent|fine|great|nice|lovely|terrible|strange|perfect|delicious|fresh|too small|too big
too expensive|a bit late|very good|really nice|quite far|almost ready|still warm|out of order|sold out
""".replace("\n", "|").split("|")
EN_ADJ = [x.strip() for x in EN_ADJ if x.strip()]

EN_WEATHER = ["sunny", "cloudy", "windy", "rainy", "foggy", "cold", "hot", "warm", "humid", "freezing",
              "chilly", "stormy", "dry", "wet", "snowy", "mild", "clear", "grey"]

EN_FEELINGS = ["happy", "sad", "tired", "worried", "excited", "nervous", "bored", "sick", "better", "sleepy",
               "hungry", "angry", "surprised", "busy", "fine", "great", "upset", "relaxed", "cold"]

EN_BODY = ["head", "back", "stomach", "tooth", "throat", "knee", "foot", "arm", "shoulder", "eye", "ear",
           "leg", "neck", "hand", "chest"]

# Requests, questions and statements of daily life; {W} etc. are filled in by `fill`.
EN_FRAMES = """
can you {VP} {TIME}
could you please {VP}
would you mind if i {VPD}
please {VP} before you leave
don't forget to {VP}
remember to {VP} {TIME}
i need to {VP} {TIME}
we have to {VP} first
i'm going to {VP} {TIME}
i want to {VP}
i'd like to {VP} please
let's {VP} {TIME}
shall we {VP}
do you want to {VP}
i think we should {VP}
you don't have to {VP}
i forgot to {VP}
i just {VPD}
i already {VPD}
she {VPD} {TIME}
he {VPD} and then went home
we {VPD} together {TIME}
they {VPD} last weekend
{PERSON} {VPD} {TIME}
{PERSON} is {VPG} right now
i'm {VPG} at the moment
are you {VPG} {TIME}
we were {VPG} when you called
i'll be {VPG} all afternoon
i hate {VPG} on {DAY}
i don't mind {VPG}
who is going to {VP}
when did you {VP}
why didn't you {VP}
how often do you {VP}
have you ever {VPD} before
did {PERSON} {VP}
does {PERSON} want to {VP}
{PERSON} wants to {VP} {TIME}
{PERSON} usually {VPS} on {DAY}
{NAME} {VPS} every morning
{NAME} asked me to {VP}
tell {NAME} to {VP}
ask {PERSON} to {VP}
i'll ask {PERSON} to {VP}
it's time to {VP}
it's your turn to {VP}
it takes an hour to {VP}
is it okay to {VP} here
where is {PLACE}
how do i get to {PLACE}
is {PLACE} far from here
how far is {PLACE}
is there a bus to {PLACE}
the bus to {PLACE} leaves at {CLOCK}
i'm on my way to {PLACE}
we are meeting at {PLACE} {TIME}
meet me outside {PLACE} at {CLOCK}
i left my {N} at {PLACE}
i'm waiting for you at {PLACE}
i'll see you at {PLACE}
turn left after {PLACE}
go straight past {PLACE}
{PLACE} is closed on {DAY}
{PLACE} opens at {CLOCK}
{PLACE} is just around the corner
is {PLACE} open {TIME}
i usually go to {PLACE} on {DAY}
can you drop me at {PLACE}
please take me to {PLACE}
how much is a ticket to {CITY}
we are flying to {CITY} {TIME}
my cousin lives in {CITY}
i grew up in {CITY}
the flight to {CITY} is delayed
have you ever been to {CITY}
the train from {CITY} arrives at {CLOCK}
it's very {WEATHER} in {CITY} {TIME}
what time is it
what time does the {N} shop open
it's already {CLOCK}
the meeting starts at {CLOCK}
let's meet at {CLOCK} {TIME}
i'll be there at {CLOCK}
my alarm goes off at {CLOCK}
the shop closes at {CLOCK} on {DAY}
we're leaving at {CLOCK} sharp
can we move the meeting to {DAY}
i'm free on {DAY} afternoon
i have an appointment on {DAY}
see you on {DAY}
my birthday is in {MONTH}
we are going on holiday in {MONTH}
the course starts in {MONTH}
do you have {ITEM}
we need more {ITEM}
we're out of {ITEM}
can you get some {ITEM} on the way home
i'll pick up {ITEM} {TIME}
how much is the {N}
how much do i owe you
do you take cards
can i pay by card
i'd like to return this {N}
this {N} is {ADJ}
the {N} is {ADJ}
my {N} is broken
i can't find my {N}
have you seen my {N}
where did you put the {N}
is this your {N}
can i borrow your {N}
put the {N} on the table
the {N} is in the drawer
i bought a new {N} {TIME}
this {N} was a present from {PERSON}
i'll have {DISH} please
could we have the menu please
can i get {DISH} without onions
the {DISH} was {ADJ}
what's for {MEAL}
what do you want for {MEAL}
we had {DISH} for {MEAL}
let's have {DISH} for {MEAL} {TIME}
i'm making {DISH} for {MEAL}
dinner is ready
i'm hungry let's eat
a table for {NUM} please
we need a table for {NUM} at {CLOCK}
can we get the bill please
it's {WEATHER} today
it's going to be {WEATHER} {TIME}
it was really {WEATHER} {TIME}
is it going to rain {TIME}
take an umbrella it might rain
the weather is {WEATHER} and {WEATHER}
it's too {WEATHER} to {VP}
the forecast says it will be {WEATHER}
i feel {FEEL} today
i'm feeling a bit {FEEL}
she looks {FEEL}
my {BODY} hurts
i have a pain in my {BODY}
i hurt my {BODY} {TIME}
you should see a doctor
i need to see the dentist
take this medicine twice a day
how are you feeling {TIME}
{PERSON} is {FEEL} {TIME}
i work as {JOB}
my sister is {JOB}
{NAME} wants to become {JOB}
i'm working from home {TIME}
i have a meeting at {CLOCK}
the report is due on {DAY}
can you send me the {N} {TIME}
i'll finish the report {TIME}
my boss asked me to {VP}
we're hiring {JOB}
i'm running late i'll be there in {NUM} minutes
{PERSON} is coming to visit {TIME}
we're visiting {PERSON} {TIME}
my parents live near {PLACE}
{PERSON} has {NUM} children
how old is your {REL}
my {REL} is {NUM} years old
my {REL} lives in {CITY}
say hello to your {REL}
what does {W} mean
how do you spell {W}
the word {W} is hard to say
i read an article about {WN}
we talked about {WN} at work
he kept talking about {WN}
is there anything about {WN} in the news
did you hear the word {W}
she wrote {W} on the board
type {W} in the search box
the next word is {W}
i don't understand the word {W}
the {WN} was {ADJ}
there's a problem with the {WN}
what do you think about the {WN}
they are worried about the {WN}
i like {WG}
she's really good at {WG}
{WG} is not easy
how long have you been {VPG}
thank you for {VPG}
sorry i'm late
sorry i didn't hear you
could you say that again please
could you speak a bit slower please
no problem
see you {TIME}
thanks a lot for your help
good morning how are you
have a nice {DAY}
nice to meet you {NAME}
excuse me is this seat free
i'm sorry i don't know
i'm not sure {PERSON} knows
that sounds {ADJ}
it's not {ADJ} at all
what's the matter
what happened {TIME}
where are you going {TIME}
who called {TIME}
which {N} is yours
whose {N} is this
how many {NS} do you need
i have {NUM} {NS} at home
there are {NUM} {NS} on the table
we bought {NUM} {NS}
all the {NS} are {ADJ}
put the {NS} in the box
the {NS} are next to the {N}
""".strip().split("\n")

EN_REL = ["mother", "father", "sister", "brother", "son", "daughter", "grandmother", "grandfather",
          "aunt", "uncle", "cousin", "wife", "husband", "niece", "nephew", "friend", "neighbour"]

EN_OPENERS = ["okay", "so", "well", "hey", "excuse me", "by the way", "actually", "sorry", "yes", "no",
              "listen", "oh", "alright", "hi", "hello", "look", "anyway", "honestly"]
EN_JOINERS = ["and", "but", "because", "so", "then", "and then", "after that", "or"]

# wordfreq words with these endings are nouns often enough to fill a noun slot
EN_NOUN_SUFFIXES = ("tion", "sion", "ment", "ness", "ity", "ship", "ance", "ence", "ism", "hood", "ery", "age")
EN_GERUND_SKIP = {"thing", "bring", "during", "nothing", "something", "anything", "everything", "evening",
                  "morning", "spring", "string", "king", "wing", "ring", "sing", "sting", "ceiling",
                  "building", "wedding", "pudding", "sibling", "darling", "viking", "bing", "ping", "ling"}


def en_plural(noun: str) -> str:
    if noun in EN_PLURAL:
        return EN_PLURAL[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u"):
        return noun[:-1] + "ies"
    return noun + "s"


def en_inflect(phrase: str, form: int) -> str:
    """The verb phrase with its first word in form 0 (third person), 1 (past) or 2 (-ing)."""
    verb, _, rest = phrase.partition(" ")
    word = EN_VERB_FORMS[verb][form]
    return word + (" " + rest if rest else "")


# --------------------------------------------------------------------------------------------
# Hindi
# --------------------------------------------------------------------------------------------

# (object phrase, verb stem, polite imperative): infinitive = stem + "ना", oblique = stem + "ने"
HI_VERB_PHRASES = [
    ("खाना", "खा", "खाइए"), ("चाय", "पी", "पीजिए"), ("पानी", "पी", "पीजिए"),
    ("दरवाजा", "खोल", "खोलिए"), ("खिड़की", "बंद कर", "बंद कीजिए"), ("बत्ती", "बंद कर", "बंद कीजिए"),
    ("पंखा", "चालू कर", "चालू कीजिए"), ("टिकट", "बुक कर", "बुक कीजिए"), ("बिल", "भर", "भरिए"),
    ("किराया", "दे", "दीजिए"), ("फोन", "कर", "कीजिए"), ("संदेश", "भेज", "भेजिए"),
    ("ईमेल", "भेज", "भेजिए"), ("रिपोर्ट", "लिख", "लिखिए"), ("चिट्ठी", "लिख", "लिखिए"),
    ("किताब", "पढ़", "पढ़िए"), ("अखबार", "पढ़", "पढ़िए"), ("फिल्म", "देख", "देखिए"),
    ("समाचार", "देख", "देखिए"), ("कपड़े", "धो", "धोइए"), ("बर्तन", "धो", "धोइए"),
    ("कमरा", "साफ कर", "साफ कीजिए"), ("खाना", "बना", "बनाइए"), ("सब्जी", "खरीद", "खरीदिए"),
    ("दवाई", "ले", "लीजिए"), ("आराम", "कर", "कीजिए"), ("इंतजार", "कर", "कीजिए"),
    ("गाड़ी", "चला", "चलाइए"), ("गाना", "गा", "गाइए"), ("क्रिकेट", "खेल", "खेलिए"),
    ("बच्चों को", "पढ़ा", "पढ़ाइए"), ("सामान", "पैक कर", "पैक कीजिए"), ("पौधों को पानी", "दे", "दीजिए"),
    ("फॉर्म", "भर", "भरिए"), ("चाबी", "ढूंढ", "ढूंढिए"), ("बाल", "कटवा", "कटवाइए"),
    ("डॉक्टर को", "दिखा", "दिखाइए"), ("नाश्ता", "कर", "कीजिए"), ("काम", "खत्म कर", "खत्म कीजिए"),
    ("मीटिंग", "शुरू कर", "शुरू कीजिए"), ("पैसे", "जमा कर", "जमा कीजिए"), ("फोटो", "खींच", "खींचिए"),
    ("गेट", "बंद कर", "बंद कीजिए"),
]
# things by grammatical gender: adjectives, possessives and verbs agree with them
HI_THINGS_M = ("फोन बटुआ बैग छाता टिकट पासपोर्ट डिब्बा कप गिलास चम्मच तौलिया तकिया चश्मा साबुन बल्ब "
               "टीवी पंखा कूलर फ्रिज लैपटॉप चार्जर कैमरा नक्शा कार्ड पलंग दरवाजा ताला बक्सा").split()
HI_THINGS_F = ("चाबी किताब कलम चिट्ठी बोतल कुर्सी मेज खिड़की थाली चादर घड़ी कमीज साड़ी दवाई गाड़ी "
               "साइकिल रसीद फाइल टोपी छतरी अलमारी बाल्टी").split()
HI_CLOCK = ("एक दो तीन चार पांच छह सात आठ नौ दस ग्यारह बारह").split()
# wordfreq's Hindi list cannot be split by part of speech without a tagger; postposition
# frames accept most of its nouns, the mention frames any word
HI_ITEMS = ("दूध ब्रेड अंडे मक्खन पनीर चावल आटा चीनी नमक चायपत्ती कॉफी दाल तेल सेब केले संतरे अंगूर आम "
            "टमाटर आलू प्याज गाजर लहसुन अदरक नींबू मिर्च धनिया पालक भिंडी गोभी मटर बिस्कुट दही घी").split()
HI_PLACES = [p.replace("~", " ") for p in
             "स्टेशन बस~अड्डा हवाई~अड्डा बैंक डाकघर बाजार दुकान अस्पताल दवाखाना स्कूल कॉलेज दफ्तर पार्क मंदिर "
             "होटल सिनेमा~हॉल पुस्तकालय संग्रहालय रसोई बगीचा छत मेट्रो~स्टेशन पेट्रोल~पंप थाना गांव शहर घर".split()]
HI_CITIES = ["दिल्ली", "मुंबई", "कोलकाता", "चेन्नई", "बेंगलुरु", "जयपुर", "लखनऊ", "पटना", "भोपाल", "पुणे", "आगरा",
             "वाराणसी", "इंदौर", "चंडीगढ़", "अहमदाबाद", "हैदराबाद", "नागपुर", "कानपुर", "शिमला", "गोवा"]
HI_PEOPLE = [p.replace("~", " ") for p in
             "मेरी~मां मेरे~पिताजी मेरी~बहन मेरा~भाई मेरी~पत्नी मेरे~पति मेरा~बेटा मेरी~बेटी मेरी~दादी मेरे~दादाजी "
             "मेरे~चाचा मेरी~मौसी मेरा~दोस्त पड़ोसी डॉक्टर~साहब नर्स ड्राइवर मैनेजर मास्टरजी दुकानदार मकान~मालिक "
             "बच्चे मेहमान सब~लोग आपके~भाई उनकी~बेटी".split()]
HI_NAMES = ["राम", "सीता", "राहुल", "प्रिया", "अमित", "नेहा", "सुनील", "अनीता", "रवि", "पूजा", "विकास", "कविता",
            "अर्जुन", "मीरा", "संजय", "गीता", "मोहन", "रीना", "आकाश", "सोनिया"]
HI_TIMES = [t.replace("~", " ") for t in
            "आज कल परसों अभी सुबह~सुबह आज~शाम आज~रात कल~सुबह कल~शाम अगले~हफ्ते अगले~महीने पिछले~हफ्ते "
            "रविवार~को सोमवार~को हर~रोज़ हर~सुबह दोपहर~में शाम~को रात~को थोड़ी~देर~में दस~मिनट~में "
            "आधे~घंटे~में एक~घंटे~बाद खाने~के~बाद काम~के~बाद".split()]
HI_ADJ = ("अच्छा ठंडा गरम महंगा सस्ता नया पुराना भारी हल्का साफ गंदा खाली भरा बंद खुला टूटा ताजा "
          "स्वादिष्ट जरूरी आसान मुश्किल बढ़िया खराब तैयार").split()
HI_WEATHER = [w.replace("~", " ") for w in
              "बहुत~गर्मी बहुत~ठंड तेज~बारिश हल्की~बारिश धूप कोहरा तेज~हवा उमस बादल".split()]
HI_BODY = "सिर पेट पीठ दांत गला घुटना पैर हाथ कंधा आंख कान गर्दन".split()
HI_FRAMES = """
क्या आप {VINF} चाहते हैं
मुझे {TIME} {VINF} है
हमें {VINF} होगा
कृपया {VPOL}
{TIME} {VPOL}
मैं {VSTEM} रहा हूं
वह {TIME} {VSTEM} रही है
क्या आप {VSTEM} सकते हैं
हम {TIME} {VSTEM} सकते हैं
{PERSON} {VSTEM} रहे हैं
{VOBL} के बाद घर चलेंगे
{VOBL} से पहले मुझे फोन करना
{VOBL} में कितना समय लगेगा
{PERSON} को {VINF} है
{NAME} को बोलो कि {VPOL}
{PLACE} कहां है
{PLACE} कितनी दूर है
{PLACE} कैसे जाना है
मैं {PLACE} जा रहा हूं
हम {TIME} {PLACE} जाएंगे
मुझे {PLACE} के पास उतार दीजिए
{PLACE} {TIME} बंद रहेगा
{PLACE} के सामने मिलते हैं
मेरा घर {PLACE} के पीछे है
{PLACE} यहां से बहुत पास है
{CITY} की ट्रेन कितने बजे है
हम {TIME} {CITY} जा रहे हैं
मेरी बहन {CITY} में रहती है
{CITY} का टिकट कितने का है
{CITY} में आज {WEATHER} है
मेरा {NM} कहां है
मेरी {NF} कहां है
मुझे मेरा {NM} नहीं मिल रहा
मुझे मेरी {NF} नहीं मिल रही
यह {NM} किसका है
यह {NF} किसकी है
क्या मैं आपका {NM} ले सकता हूं
क्या मैं आपकी {NF} ले सकती हूं
{NM} मेज पर रख दो
{NF} अलमारी में रख दो
{NM} बहुत {ADJ} है
यह {NM} {ADJ} है
मुझे नया {NM} खरीदना है
मुझे नई {NF} खरीदनी है
{PERSON} ने {NM} भेजा है
{PERSON} ने {NF} भेजी है
{ITEM} कितने का है
हमें {ITEM} और {ITEM} चाहिए
घर में {ITEM} खत्म है
आते समय {ITEM} ले आना
मुझे एक किलो {ITEM} दीजिए
{ITEM} किस भाव है
आज खाने में क्या है
आज {TIME} मौसम कैसा रहेगा
आज {WEATHER} है
{TIME} {WEATHER} रहने की उम्मीद है
बाहर {WEATHER} है छाता ले लो
मेरे {BODY} में दर्द है
मेरा {BODY} दुख रहा है
डॉक्टर ने दवाई दिन में दो बार लेने को कहा
{PERSON} की तबीयत ठीक नहीं है
{PERSON} {TIME} आएंगे
{PERSON} से बात करनी है
{NAME} कहां है
{NAME} {TIME} {PLACE} जाने वाले हैं
मीटिंग {DAY} को {CLOCK} बजे है
मैं {CLOCK} बजे तक पहुंच जाऊंगा
{DAY} को दफ्तर बंद रहेगा
मेरा जन्मदिन {MONTH} में है
{NUM} लोगों के लिए मेज चाहिए
इसकी कीमत {NUM} रुपये है
{W} का मतलब क्या है
{W} शब्द फिर से बोलिए
उसने बोर्ड पर {W} लिखा
अगला शब्द {W} है
क्या आपने {W} के बारे में सुना है
हम {W} के बारे में बात कर रहे थे
धन्यवाद आपकी मदद के लिए
माफ कीजिए मुझे देर हो गई
फिर से बोलिए
थोड़ा धीरे बोलिए
कोई बात नहीं
आप कैसे हैं
""".strip().split("\n")
HI_OPENERS = ["अच्छा", "सुनो", "हां", "नहीं", "ठीक है", "अरे", "देखिए", "वैसे", "भाई साहब", "जी"]
HI_JOINERS = ["और", "लेकिन", "क्योंकि", "इसलिए", "फिर", "या"]


# --------------------------------------------------------------------------------------------
# Filling frames
# --------------------------------------------------------------------------------------------

class Fillers:
    """The slot fillers of one language: `word` draws a frequency-ranked wordfreq word (open_text's
    Sampler), `noun` and `gerund` one that looks like a noun or an -ing form (None where the
    vocabulary has none); `number` and `clock` speak numbers and clock times."""

    def __init__(self, lang: str, rng: random.Random, word: Callable[[], str], noun: Callable[[], str | None],
                 gerund: Callable[[], str | None], number: Callable[[], str], clock: Callable[[], str]):
        self.lang, self.rng = lang, rng
        c = rng.choice
        if lang == "en":
            def thing() -> str:
                w = noun() if rng.random() < 0.3 else None
                return w or c(EN_THINGS)

            def any_gerund() -> str:
                w = gerund() if rng.random() < 0.5 else None
                return w or en_inflect(c(EN_VERB_PHRASES), 2)

            self.slots: dict[str, Callable[[], str]] = {
                "VP": lambda: c(EN_VERB_PHRASES), "VPS": lambda: en_inflect(c(EN_VERB_PHRASES), 0),
                "VPD": lambda: en_inflect(c(EN_VERB_PHRASES), 1), "VPG": lambda: en_inflect(c(EN_VERB_PHRASES), 2),
                "N": thing, "NS": lambda: en_plural(c(EN_THINGS)), "ITEM": lambda: c(EN_ITEMS),
                "MEAL": lambda: c(EN_MEALS), "DISH": lambda: c(EN_DISHES), "PLACE": lambda: c(EN_PLACES),
                "CITY": lambda: c(EN_CITIES), "PERSON": lambda: c(EN_PEOPLE), "NAME": lambda: c(EN_NAMES),
                "JOB": lambda: c(EN_JOBS), "TIME": lambda: c(EN_TIMES), "DAY": lambda: c(EN_DAYS),
                "MONTH": lambda: c(EN_MONTHS), "ADJ": lambda: c(EN_ADJ), "WEATHER": lambda: c(EN_WEATHER),
                "FEEL": lambda: c(EN_FEELINGS), "BODY": lambda: c(EN_BODY), "REL": lambda: c(EN_REL),
                "NUM": number, "CLOCK": clock, "W": word,
                "WN": lambda: noun() or c(EN_THINGS), "WG": any_gerund,
            }
            self.frames, self.openers, self.joiners = EN_FRAMES, EN_OPENERS, EN_JOINERS
        else:
            def verb(i: int) -> Callable[[], str]:
                def f() -> str:
                    obj, stem, polite = c(HI_VERB_PHRASES)
                    return obj + " " + (stem + "ना", stem, polite, stem + "ने")[i]
                return f

            self.slots = {
                "VINF": verb(0), "VSTEM": verb(1), "VPOL": verb(2), "VOBL": verb(3),
                "NM": lambda: c(HI_THINGS_M), "NF": lambda: c(HI_THINGS_F), "CLOCK": clock,
                "ITEM": lambda: c(HI_ITEMS), "PLACE": lambda: c(HI_PLACES),
                "CITY": lambda: c(HI_CITIES), "PERSON": lambda: c(HI_PEOPLE), "NAME": lambda: c(HI_NAMES),
                "TIME": lambda: c(HI_TIMES), "ADJ": lambda: c(HI_ADJ), "WEATHER": lambda: c(HI_WEATHER),
                "BODY": lambda: c(HI_BODY), "NUM": number, "W": word,
                "DAY": lambda: c("सोमवार मंगलवार बुधवार गुरुवार शुक्रवार शनिवार रविवार".split()),
                "MONTH": lambda: c("जनवरी फरवरी मार्च अप्रैल मई जून जुलाई अगस्त सितंबर अक्टूबर नवंबर दिसंबर".split()),
            }
            self.frames, self.openers, self.joiners = HI_FRAMES, HI_OPENERS, HI_JOINERS

    def fill(self, frame: str) -> str:
        return SLOT.sub(lambda m: self.slots[m.group(1)](), frame)

    def sentence(self) -> str:
        """One frame, sometimes after a discourse opener, sometimes joined to a second short one:
        word order across a clause boundary is what word runs never show."""
        rng = self.rng
        s = self.fill(rng.choice(self.frames))
        r = rng.random()
        if r < 0.12:
            s = rng.choice(self.openers) + " " + s
        elif r < 0.24 and len(s.split()) <= 6:
            second = self.fill(rng.choice(self.frames))
            if len(second.split()) <= 6:
                s = s + " " + rng.choice(self.joiners) + " " + second
        return s


def en_noun_like(words: list[str]) -> list[str]:
    """The words whose ending marks them as nouns, in their frequency order."""
    return [w for w in words if len(w) > 5 and w.endswith(EN_NOUN_SUFFIXES)]


def en_gerund_like(words: list[str]) -> list[str]:
    """The -ing words that are verb forms (not "thing", "morning", ...), in their frequency order."""
    return [w for w in words if len(w) > 5 and w.endswith("ing") and w not in EN_GERUND_SKIP]
