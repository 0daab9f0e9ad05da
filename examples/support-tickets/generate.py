"""Generates train.jsonl: Acme support tickets labelled with a category and a priority.

Deterministic (seeded, standard library only), so the committed file can always be rebuilt:

    python examples/support-tickets/generate.py            # writes train.jsonl next to this script
    python examples/support-tickets/generate.py --seed 7 --count 60 --out /tmp/eval.jsonl

The labels follow rules a model can learn from the text alone:

- category: the topic of the ticket's main sentence (money -> billing, errors and slowness -> technical,
  logins and users -> account, parcels -> shipping, "please add" -> feature_request).
- priority: urgent when the issue is critical in itself (an outage, a double or unauthorized charge,
  being locked out entirely or hacked, a hazardous parcel); otherwise a cue decides: "ASAP"-style
  cues make it high, "no rush"-style cues make it low, no cue leaves it medium. Plain questions are
  low. Feature requests are low, or medium when the customer says their business depends on it.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 20240611
COUNT = 320
HERE = Path(__file__).resolve().parent

SYSTEM = (
    "Classify the Acme support ticket. Reply with JSON only: "
    '{"category": billing|technical|account|shipping|feature_request, '
    '"priority": low|medium|high|urgent}'
)

# --- fillers -------------------------------------------------------------------------------------

NAMES = [
    "Priya", "Marco", "Aisha", "Tom", "Sofia", "Kenji", "Fatima", "Lukas", "Grace", "Diego",
    "Hannah", "Omar", "Elena", "Noah", "Mei", "Jonas", "Chloe", "Ravi", "Zoe", "Samuel",
]  # fmt: skip
PRODUCTS = [
    "Acme Analytics",
    "Acme Sync",
    "Acme Forms",
    "Acme Desk",
    "the Acme mobile app",
    "the Acme dashboard",
]
PLANS = ["Starter", "Pro", "Business", "Team"]
ITEMS = [
    "wireless earbuds", "standing desk", "espresso machine", "hiking backpack", "desk lamp",
    "mechanical keyboard", "yoga mat", "air fryer", "office chair", "blender", "phone case", "monitor",
]  # fmt: skip
BATTERY_ITEMS = ["power bank", "laptop battery", "e-bike battery", "portable charger", "drill battery"]
AMOUNTS = ["$9.99", "$19.00", "$29.00", "$49.00", "$79.99", "$99.00", "$129.00", "$249.00", "$18.50"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "September", "October"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
COUNTRIES = ["Canada", "Germany", "Brazil", "Japan", "Australia", "Mexico", "Norway", "India", "Spain"]
CITIES = ["Denver", "Leeds", "Lyon", "Austin", "Toronto", "Porto", "Osaka", "Dublin", "Seattle"]
BROWSERS = ["Chrome", "Firefox", "Safari", "Edge", "Safari on my iPhone", "Chrome on Android"]
ERRORS = ["error 500", "error 502", "a timeout", "error code E-1042", "'Something went wrong'", "error 503"]
INTEGRATIONS = ["Slack", "Salesforce", "Shopify", "Google Sheets", "HubSpot", "Zapier", "QuickBooks"]
FEATURES = [
    "dark mode", "an export to PDF button", "bulk editing", "scheduled email reports", "a Spanish version",
    "keyboard shortcuts", "custom fields on contacts", "an undo button", "single sign-on with Okta",
    "saved filters", "recurring tasks", "a Gantt view", "two-way calendar sync", "an audit log",
]  # fmt: skip
RELATIONS = ["daughter", "son", "wife", "husband", "mom", "dad", "best friend"]


def fillers(rng: random.Random) -> dict[str, str]:
    """One random value for every placeholder; templates use the few they name."""
    item_a, item_b = rng.sample(ITEMS, 2)
    plan, plan2 = rng.sample(PLANS, 2)
    amount, amount2 = rng.sample(AMOUNTS, 2)
    name, name2 = rng.sample(NAMES, 2)
    return {
        "name": name,
        "name2": name2,
        "product": rng.choice(PRODUCTS),
        "plan": plan,
        "plan2": plan2,
        "item": item_a,
        "item2": item_b,
        "battery_item": rng.choice(BATTERY_ITEMS),
        "amount": amount,
        "amount2": amount2,
        "order": f"#{rng.randint(100000, 999999)}",
        "invoice": f"INV-{rng.randint(1000, 9999)}",
        "last4": f"{rng.randint(0, 9999):04d}",
        "code": rng.choice(["SPRING10", "WELCOME15", "ACME20", "LOYAL5", "SAVE25"]),
        "month": rng.choice(MONTHS),
        "date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}",
        "day": rng.choice(DAYS),
        "country": rng.choice(COUNTRIES),
        "city": rng.choice(CITIES),
        "browser": rng.choice(BROWSERS),
        "error": rng.choice(ERRORS),
        "integration": rng.choice(INTEGRATIONS),
        "feature": rng.choice(FEATURES),
        "relation": rng.choice(RELATIONS),
        "few": rng.choice(["two", "three", "four", "five"]),
        "count": str(rng.choice([3, 4, 5, 12, 20, 35, 40, 120])),
        "minutes": str(rng.choice([15, 20, 30, 45, 90])),
        "size": str(rng.choice([10, 25, 50, 100])),
        "email": f"{name.lower()}@{rng.choice(['gmail.com', 'outlook.com', 'proton.me', 'acme-client.io'])}",
        "time": rng.choice(["8am", "9:30 this morning", "noon", "early this morning", "last night"]),
    }


# --- ticket bodies ---------------------------------------------------------------------------------
# "critical": urgent by itself. "normal": medium unless a cue says otherwise. "question": low.

BODIES: dict[str, dict[str, list[str]]] = {
    "billing": {
        "critical": [
            "I was charged twice for my {plan} subscription this month, {amount} both times.",
            "My card ending in {last4} was billed {amount} two times on {date}.",
            "There's a charge of {amount} from Acme on my statement that I never authorized.",
            "Acme charged my card {amount} three times in one day.",
            "We got billed twice for invoice {invoice}, {amount} each time.",
            "I see {few} charges from your store on my card that I didn't make.",
            "You charged me {amount} after I cancelled on {date}; I never authorized that payment.",
        ],
        "normal": [
            "My invoice for {month} shows {amount} but my plan is only {amount2}.",
            "I upgraded to the {plan} plan on {date} but I'm still billed for the {plan2} plan.",
            "I asked for a refund of {amount} on {date} and it hasn't reached my card yet.",
            "Our VAT number is missing from invoice {invoice}; could you send a corrected copy?",
            "My card ending in {last4} keeps getting declined when I pay, but it works everywhere else.",
            "The discount code {code} wasn't applied to my last bill.",
            "I picked monthly billing but was charged the yearly price of {amount}.",
            "The company name on invoice {invoice} is misspelled.",
            "I downgraded from {plan} to {plan2} but never got the prorated credit on my bill.",
            "The price of my {plan} plan went up to {amount} without any notice.",
        ],
        "question": [
            "Can you tell me when my next invoice will be issued?",
            "Do you accept PayPal for the {plan} plan?",
            "Is it possible to switch our billing to yearly?",
            "Where can I download our past invoices for the accountant?",
            "What currency will I be billed in if I'm based in {country}?",
            "What's the price difference between the {plan} and {plan2} plans?",
        ],
    },
    "technical": {
        "critical": [
            "{product} is completely down for our whole company; no page loads at all.",
            "Our checkout returns {error} for every customer, so we can't take any orders.",
            "All of our dashboards vanished after this morning's update and the data seems gone.",
            "The API has returned {error} on every call for {minutes} minutes; production is down.",
            "Outage: {product} hasn't loaded for any of our {count} users since {time}.",
            "A sync with {integration} just deleted thousands of records from our workspace.",
            "Everything in {product} shows {error} for every user on our team since {time}.",
        ],
        "normal": [
            "The {product} reports page takes over a minute to load in {browser}.",
            "CSV exports from {product} come out empty.",
            "The {integration} integration stopped syncing new records on {date}.",
            "I get {error} when I upload a file larger than {size} MB.",
            "{product} crashes every time I open the reports tab in {browser}.",
            "Charts in {product} show times in the wrong time zone.",
            "Our webhooks fire twice for every event since {day}.",
            "Search in {product} finds nothing when the word has an accent, like café.",
            "Scheduled reports stopped arriving in our inbox after {date}.",
            "The mobile app freezes on the loading screen after the latest update.",
        ],
        "question": [
            "Is there a keyboard shortcut to duplicate a chart in {product}?",
            "Does the API support pagination on the orders endpoint?",
            "Which browsers do you support for {product}?",
            "What's the rate limit on the public API?",
            "Can {product} pull data from {integration}, or only push to it?",
            "Is there a way to get API error logs for the past week?",
        ],
    },
    "account": {
        "critical": [
            "I can't log in at all; every password reset email bounces and I'm locked out.",
            "Someone hacked my account and changed the email to one I don't recognize.",
            "I'm completely locked out of our only admin account, so nobody on the team can work.",
            "I got an alert that my password was changed from {country}, and it wasn't me.",
            "Our workspace was suspended without warning and all {count} of our users are locked out.",
            "I can't log in at all, the two-factor codes are rejected every time.",
            "Someone else is logged into my account and has been changing my settings.",
        ],
        "normal": [
            "Please change the email on my account to {email}.",
            "The password reset link has already expired by the time I click it.",
            "I can't add a new teammate; the invite email never arrives.",
            "My profile shows the name {name2} instead of {name}.",
            "I need to transfer ownership of our workspace to {name2} before I leave the company.",
            "Please delete my account and all of my personal data.",
            "Two-factor login asks for a code every time, even on my trusted laptop.",
            "I was removed as an admin by mistake and can only view things now.",
            "I made two accounts by accident; can you merge them into {email}?",
            "My account still shows my old last name after I changed it on {date}.",
        ],
        "question": [
            "How do I turn on two-factor authentication?",
            "Can I change my username, or is it fixed?",
            "Is there a way to see which devices are logged into my account?",
            "How many admins can one workspace have?",
            "Can I have one login for two separate workspaces?",
            "Where do I change my account's language setting?",
        ],
    },
    "shipping": {
        "critical": [
            "The {battery_item} in order {order} arrived swollen and hot to the touch.",
            "My package arrived crushed and the {battery_item} inside is leaking and smells like burning.",
            "The {battery_item} from order {order} started smoking as I took it out of the box.",
            "Order {order} arrived with the {battery_item} cracked open and sparking.",
            "The box from order {order} was damaged and the {battery_item} inside is bulging and very hot.",
        ],
        "normal": [
            "Order {order} was due on {date} and the tracking hasn't moved since.",
            "I got a {item2} instead of the {item} I ordered (order {order}).",
            "My {item} arrived with a dented box and a scratch down the side.",
            "The tracking for order {order} has said 'label created' for a week.",
            "Only one of the two items in order {order} has arrived.",
            "Order {order} is marked delivered, but it isn't at my door or with my neighbors.",
            "Please change the delivery address on order {order}; I just moved to {city}.",
            "My {item} was delivered to the wrong building.",
            "The courier left my {item} out in the rain and the box is soaked.",
            "Order {order} shipped to {city} instead of my address in {country}.",
        ],
        "question": [
            "Do you ship to {country}?",
            "How long does standard delivery usually take to {city}?",
            "What's your return window for the {item}?",
            "Can I pick up my order at a store instead of having it delivered?",
            "Is express shipping available for the {item}?",
            "Do you combine shipping if I order the {item} with other things?",
        ],
    },
    "feature_request": {
        # Feature requests never get ASAP-style cues: "low" is the default, "important" is medium.
        "low": [
            "It would be nice if {product} had {feature}.",
            "Any plans to add {feature}?",
            "Small idea: {feature} in {product} would make my day a little easier.",
            "Have you thought about adding {feature}? It would be a nice touch.",
            "I'd love to see {feature} in {product} someday.",
            "Could you consider {feature} for a future release?",
            "Feature idea: {feature}.",
        ],
        "medium": [
            "Our team really needs {feature} in {product}; we lose hours every week working around it.",
            "Several of our clients have asked for {feature}; can you add it to the roadmap?",
            "Please add {feature}; it's the main thing stopping us from moving our whole team over.",
            "We'd like to request {feature}, as without it we copy everything into spreadsheets by hand.",
            "Please add {feature} to {product}; our {count} users ask me about it every week.",
            "We need {feature} before we can roll {product} out to the rest of the company.",
        ],
    },
}

# --- cues: the words that move the priority ---------------------------------------------------------

HIGH_CUES = [
    "Please fix this ASAP.",
    "I need this sorted out today.",
    "Please treat this as a priority.",
    "This is time-sensitive, please help as soon as possible.",
    "We have a deadline on {day}, so I need this resolved quickly.",
    "Please get back to me ASAP.",
]
HIGH_CUES_BY_CATEGORY = {
    "technical": ["This is blocking my whole team.", "We have a client demo tomorrow morning."],
    "account": ["I can't do my job until this is fixed.", "I need this done before {day}'s board meeting."],
    "shipping": [
        "I need it for my {relation}'s birthday this weekend.",
        "It's a gift and I need it by {day}.",
    ],
    "billing": ["Our accounting closes the month on {day}, so I need this fixed today."],
}
LOW_CUES = [
    "No rush, whenever you get a chance.",
    "Not urgent at all.",
    "Just flagging it, no hurry.",
    "Whenever you have a moment is fine.",
    "This can wait until next week.",
    "No rush on this one.",
]
FEATURE_LOW_CUES = [
    "Just a suggestion.",
    "No rush at all.",
    "Just a thought, thanks!",
    "Whenever you get a chance.",
]
URGENT_CUES = ["Please help immediately!", "This is an emergency.", "Please act on this right away."]
URGENT_CUES_BY_CATEGORY = {
    "technical": ["We are losing sales every minute."],
    "shipping": ["I'm scared it could catch fire."],
    "billing": ["Please reverse this right away."],
    "account": ["Please secure my account right now."],
}

OPENERS = ["Hi,", "Hello,", "Hi Acme team,", "Hey there,", "Good morning,", "Hello support,", "Hi folks,"]
CLOSERS = [
    "Thanks, {name}",
    "Thank you!",
    "Regards, {name}",
    "Cheers, {name}",
    "Thanks in advance.",
    "- {name}",
]


# --- assembling tickets -----------------------------------------------------------------------------

# (category, priority, body kind, cue list chooser) and how many of each; 320 in all.
Slot = tuple[str, str, str, Callable[[str], list[str]]]


def _no_cue(_category: str) -> list[str]:
    return []


def _high(category: str) -> list[str]:
    return HIGH_CUES + HIGH_CUES_BY_CATEGORY.get(category, [])


def _low(_category: str) -> list[str]:
    return LOW_CUES


def _urgent(category: str) -> list[str]:
    return URGENT_CUES + URGENT_CUES_BY_CATEGORY.get(category, [])


def _feature_low(_category: str) -> list[str]:
    return FEATURE_LOW_CUES


def plan(count: int) -> list[Slot]:
    """The label mix: every category equally, each issue category across all four priorities."""
    shares: list[tuple[Slot, int]] = []
    for category in ("billing", "technical", "account", "shipping"):
        shares += [
            ((category, "urgent", "critical", _urgent), 14),
            ((category, "high", "normal", _high), 18),
            ((category, "medium", "normal", _no_cue), 18),
            ((category, "low", "normal", _low), 7),
            ((category, "low", "question", _low), 7),
        ]
    shares += [
        (("feature_request", "low", "low", _feature_low), 36),
        (("feature_request", "medium", "medium", _no_cue), 28),
    ]
    total = sum(share for _, share in shares)
    # Largest remainder, so any count keeps the proportions and sums exactly.
    exact = [(slot, count * share / total) for slot, share in shares]
    sizes = [int(value) for _, value in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i][1] - sizes[i], reverse=True)
    for i in by_remainder[: count - sum(sizes)]:
        sizes[i] += 1
    return [slot for (slot, _), size in zip(exact, sizes, strict=True) for _ in range(size)]


def cue_probability(priority: str, kind: str) -> float:
    """How often a ticket carries a cue: always where the cue decides the label, sometimes otherwise."""
    if priority in ("high", "low") and kind == "normal":
        return 1.0
    if kind == "low":  # a feature request is low with or without "just a suggestion"
        return 0.5
    if priority == "urgent":
        return 0.4
    if kind == "question":
        return 0.3
    return 0.0


def ticket(rng: random.Random, category: str, priority: str, kind: str, cues: list[str]) -> str:
    """One ticket's text: [greeting] issue [cue] [sign-off], laid out like a short email."""
    values = fillers(rng)
    body = rng.choice(BODIES[category][kind])
    if cues and rng.random() < cue_probability(priority, kind):
        body += " " + rng.choice(cues)
    if rng.random() < 0.4:
        body = rng.choice(OPENERS) + "\n" + body
    if rng.random() < 0.35:
        body += "\n" + rng.choice(CLOSERS)
    return body.format(**values)


def answer(category: str, priority: str) -> str:
    return json.dumps({"category": category, "priority": priority}, separators=(", ", ": "))


def generate(count: int = COUNT, seed: int = SEED) -> list[dict[str, list[dict[str, str]]]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    records = []
    for category, priority, kind, choose_cues in plan(count):
        # Re-draw exact repeats: duplicates would only weigh some tickets more.
        for _attempt in range(100):
            text = ticket(rng, category, priority, kind, choose_cues(category))
            if text not in seen:
                break
        else:
            raise RuntimeError(f"no new {category}/{priority} ticket in 100 draws; add templates or fillers")
        seen.add(text)
        records.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": answer(category, priority)},
                ]
            }
        )
    rng.shuffle(records)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=COUNT)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=HERE / "train.jsonl")
    args = parser.parse_args()
    records = generate(args.count, args.seed)
    with args.out.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} examples to {args.out}")


if __name__ == "__main__":
    main()
