"""Stage `sample`: write a synthetic support corpus (the fictional smart-home maker Northwind
Home) into `paths.incoming` when it holds no data, in every input format, with planted defects.

Runs as `python -m tasks.sample` (`retune sample`, `make data`) and as `sample_task` in flows.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from retune.config import Params, SampleParams
from retune.entry import stage_main, stage_task
from retune.reports import write_json

DEFECT_KINDS = (
    "duplicate",  # exact copy of an earlier conversation's content, possibly in another file
    "empty_turn",  # a message whose content is "" or only whitespace
    "email",  # one e-mail address in a customer message
    "phone",  # one phone number in a customer message
    "sensitive",  # a card number, IBAN, IP address, US SSN or API key in a customer message
    "overlong",  # one message (or article) longer than ingest.max_message_chars' default
    "unknown_role",  # an extra message from a speaker no role map knows ("moderator", ...)
    "missing_field",  # a message without role/content, a row without role, a pair half
    "truncated_json",  # chat JSONL only: the line is cut off mid-object
    "invalid_utf8",  # chat JSONL only: the line is encoded as cp1252, not UTF-8
    "near_duplicate",  # an earlier conversation with small edits (word, punctuation, casing...)
    "abusive",  # a customer insults the agent, or the agent the customer
    "other_language",  # a conversation in Spanish, German, French, Italian or Portuguese
)

# Share of defects per kind; e-mail and phone are half of them so redaction has plenty to do
# while the corpus stays ~98% clean at the default defect_rate.
_DEFECT_WEIGHTS = {
    "duplicate": 15,
    "empty_turn": 10,
    "email": 25,
    "phone": 25,
    "sensitive": 10,
    "overlong": 6,
    "unknown_role": 6,
    "missing_field": 6,
    "truncated_json": 5,
    "invalid_utf8": 2,
    "near_duplicate": 20,
    "abusive": 8,
    "other_language": 8,
}

_LINE_DEFECTS = ("truncated_json", "invalid_utf8")  # need a line format to break
_TABLE_DEFECTS = tuple(k for k in DEFECT_KINDS if k not in _LINE_DEFECTS)
# Conversation-only kinds: pairs have no roles to misname, and the hygiene kinds are planted
# where the conversation generator builds them.
_CONVERSATION_ONLY = ("unknown_role", "near_duplicate", "abusive", "other_language")
_PAIR_DEFECTS = tuple(k for k in _TABLE_DEFECTS if k not in _CONVERSATION_ONLY)


@dataclass(frozen=True)
class _Sink:
    key: str
    share: float
    unit: str  # "conversation" | "pair" | "article"
    defects: tuple[str, ...]


# Files and their share of `sample.conversations`; conversation-kind sinks share one pool of
# originals, so a planted duplicate can land in a different file than its original.
_SINKS = (
    _Sink("chat", 0.66, "conversation", DEFECT_KINDS),
    _Sink("csv", 0.12, "conversation", _TABLE_DEFECTS),
    _Sink("tsv", 0.06, "conversation", _TABLE_DEFECTS),
    _Sink("parquet", 0.04, "conversation", _TABLE_DEFECTS),
    _Sink("faq", 0.07, "pair", _PAIR_DEFECTS),
    _Sink("kb", 0.05, "article", ("duplicate", "overlong")),
)

CHAT_FILE = "support_chats.jsonl"
CSV_FILE = "helpdesk_export.csv"
TSV_FILE = "agent_transcripts.tsv"
PARQUET_FILE = "chat_archive.parquet"
FAQ_FILE = "faq_pairs.jsonl"
KB_DIR = "kb"

_OVERLONG_MIN_CHARS = 4_100  # just past the default ingest.max_message_chars (4,000)
_POOL_SIZE = 256
_PROGRESS_EVERY = 100_000
_PARQUET_BATCH_ROWS = 50_000
_EPOCH_2024 = 1_704_067_200  # 2024-01-01T00:00:00Z: timestamps are synthetic, never the clock


@dataclass(frozen=True)
class SampleResult:
    out_dir: Path
    files: tuple[Path, ...]
    conversations: int
    conversations_per_file: dict[str, int]  # relative posix path -> units written
    defects: dict[str, int]  # every kind in DEFECT_KINDS -> planted count
    defects_per_file: dict[str, dict[str, int]]
    categories: dict[str, int]  # category -> units (conversations, pairs, articles)
    lookalikes: int  # customer messages given order/date/serial strings that are not PII
    complaints: int  # clean conversations with an angry but not abusive customer


@dataclass(frozen=True)
class _Issue:
    problems: tuple[str, ...]
    resolutions: tuple[str, ...]


@dataclass(frozen=True)
class _Category:
    issues: tuple[_Issue, ...]
    asks: tuple[str, ...]
    details: tuple[str, ...]  # each names an order or case number, so conversations differ
    followups: tuple[tuple[str, str], ...]
    article: tuple[str, tuple[str, ...]]  # title, body lines


# fmt: off
# Hand-laid tables of template text: one template per line reads better than the formatter's
# one-element-per-line layout.
_PRODUCTS: dict[str, dict[str, Any]] = {
    "thermostat": {
        "product": "Northwind Climate thermostat", "noun": "thermostat",
        "models": ("NW-T200", "NW-T300"), "prices": ("$149.99", "$199.99"),
        "reset": "hold the dial down for 10 seconds until the ring flashes white",
        "pair": "open the Northwind app, tap Add device > Climate and scan the code behind "
                "the faceplate",
        "fix": "check that the C-wire is seated firmly and recalibrate the sensor under "
               "Settings > Temperature offset",
        "symptoms": ("shows the wrong temperature", "keeps losing its schedule",
                     "has a blank screen", "won't turn the heating on"),
    },
    "camera": {
        "product": "Northwind Sentry camera", "noun": "camera",
        "models": ("NW-C110", "NW-C220"), "prices": ("$89.99", "$129.99"),
        "reset": "press the reset pin next to the USB port for 5 seconds",
        "pair": "tap Add device > Camera in the app and hold the QR code on your phone about "
                "20 cm from the lens",
        "fix": "clean the lens, turn off HDR in the camera settings and format the microSD "
               "card from the app",
        "symptoms": ("shows a black video feed", "has blurry night vision",
                     "stops recording after a few minutes", "misses motion events"),
    },
    "doorbell": {
        "product": "Northwind Chime doorbell", "noun": "doorbell",
        "models": ("NW-D100", "NW-D150"), "prices": ("$99.99", "$159.99"),
        "reset": "hold the button on the back for 15 seconds until the light turns amber",
        "pair": "tap Add device > Doorbell and follow the wiring check in the app",
        "fix": "check that the transformer supplies at least 16 V and lower the motion "
               "sensitivity to medium",
        "symptoms": ("doesn't ring the chime inside", "drains its battery in two days",
                     "sends motion alerts late", "shows a red light"),
    },
    "lock": {
        "product": "Northwind Latch smart lock", "noun": "lock",
        "models": ("NW-L300", "NW-L350"), "prices": ("$179.99", "$229.99"),
        "reset": "remove the battery cover and hold the reset button for 10 seconds",
        "pair": "tap Add device > Lock and keep your phone within 2 meters of the lock",
        "fix": "run the door calibration again in the app and make sure the deadbolt moves "
               "freely by hand",
        "symptoms": ("jams halfway when locking", "doesn't auto-lock",
                     "rejects my access codes", "beeps three times"),
    },
    "plug": {
        "product": "Northwind Plug", "noun": "smart plug",
        "models": ("NW-P10", "NW-P20"), "prices": ("$19.99", "$29.99"),
        "reset": "hold the side button for 6 seconds until the LED blinks blue quickly",
        "pair": "tap Add device > Plug while the LED is blinking blue",
        "fix": "plug it straight into a wall outlet instead of a power strip and set up the "
               "schedule again",
        "symptoms": ("won't switch on from the app", "ignores its schedule",
                     "clicks but the lamp stays off", "shows as unresponsive"),
    },
    "router": {
        "product": "Northwind Mesh router", "noun": "router",
        "models": ("NW-R500", "NW-R700"), "prices": ("$249.99", "$349.99"),
        "reset": "press the recessed reset button for 10 seconds with a paper clip",
        "pair": "connect the main node to your modem with the Ethernet cable and tap Set up "
                "network in the app",
        "fix": "move the satellite node halfway between the main node and the dead zone and "
               "set the channel to Auto",
        "symptoms": ("drops the Wi-Fi every evening", "is slow upstairs",
                     "has a flashing red light", "won't connect to the modem"),
    },
    "speaker": {
        "product": "Northwind Sound speaker", "noun": "speaker",
        "models": ("NW-S40", "NW-S60"), "prices": ("$59.99", "$119.99"),
        "reset": "hold the volume-down and mic buttons together for 12 seconds",
        "pair": "tap Add device > Speaker and choose your home Wi-Fi",
        "fix": "turn the microphones back on with the mic button and update the speaker "
               "from Settings > Firmware",
        "symptoms": ("doesn't respond to voice commands", "crackles at high volume",
                     "keeps dropping Bluetooth", "won't play music from the app"),
    },
    "hub": {
        "product": "Northwind Hub", "noun": "hub",
        "models": ("NW-H1", "NW-H2"), "prices": ("$69.99", "$99.99"),
        "reset": "hold the reset button on the bottom for 20 seconds",
        "pair": "connect it to your router with the Ethernet cable and tap Add device > Hub",
        "fix": "move the hub at least one meter away from the router and add the sensors "
               "again one at a time",
        "symptoms": ("shows my devices as offline", "doesn't run my automations",
                     "has a solid orange light", "can't find my sensors"),
    },
}
_PRODUCT_KEYS = tuple(_PRODUCTS)

_FIRST = ("Maria", "James", "Aisha", "Chen", "Sofia", "Liam", "Priya", "Mateo", "Emma", "Noah",
          "Yuki", "Fatima", "Oliver", "Zara", "Lucas", "Hannah", "Diego", "Amara", "Ethan",
          "Ingrid", "Kofi", "Nina", "Rahul", "Chloé", "Tariq", "Elena", "Ben", "Mei", "José",
          "Zoë", "Søren", "Grace")
_LAST = ("Garcia", "Smith", "Khan", "Wang", "Rossi", "Murphy", "Patel", "Lopez", "Johnson",
         "Brown", "Tanaka", "Ali", "Wilson", "Ahmed", "Silva", "Becker", "Hernandez", "Okafor",
         "Clark", "Larsen", "Mensah", "Novak", "Sharma", "Martin", "Haddad", "Petrova", "Cohen",
         "Li", "Schmidt", "Taylor")
_AGENTS = ("Sam", "Priya", "Diego", "Mei", "Tom", "Aisha", "Lukas", "Grace", "Omar", "Elena")
_CARRIERS = ("UPS", "FedEx", "USPS", "DHL")
_PLANS = (("Northwind Protect", "$3.99 a month"), ("Northwind Protect Plus", "$9.99 a month"))
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_EMAIL_DOMAINS = ("example.com", "example.org", "mail.example.net", "example.co.uk")

_CATEGORIES: dict[str, _Category] = {
    "billing": _Category(
        issues=(
            _Issue(("I was charged twice for order {order}.",
                    "My card shows two charges of {price} for the same {noun}.",
                    "Why did you bill me twice for my {model}? I only placed one order."),
                   ("I found the duplicate charge on order {order} and refunded {price}. It "
                    "will be back on your card within {days} business days.",
                    "You're right, order {order} was charged twice. I've reversed the second "
                    "charge of {price}; please allow {days} business days for it to appear.")),
            _Issue(("My {plan} subscription renewed even though I cancelled it.",
                    "I was charged {plan_price} for {plan} but I never signed up for it.",
                    "There's a charge from Northwind Home on {date} that I don't recognize."),
                   ("That charge is the fee for {plan}, {plan_price}. I've cancelled the "
                    "subscription and refunded the last payment.",
                    "I see {plan} was still active on your account. It's now cancelled, and "
                    "the charge from {date} has been refunded.")),
            _Issue(("My promo code didn't work and I paid the full {price} for the {model}.",
                    "I used a discount code at checkout but I was still charged {price}.",
                    "The sale price wasn't applied to my {noun}."),
                   ("I've applied the promotion to order {order} and refunded the difference "
                    "to your original payment method.",
                    "Sorry about that. The discount is now applied to order {order}, and the "
                    "difference will be refunded within {days} business days.")),
            _Issue(("Can I get an invoice for my {model}?",
                    "I need a VAT invoice for my {noun} purchase.",
                    "Where can I download the receipt for my order?"),
                   ("I've emailed the invoice for order {order} to the address on your "
                    "account. You can also download it any time under Account > Orders.",
                    "You can download it from Account > Orders > {order} > Invoice. I've also "
                    "sent a copy to your email.")),
        ),
        asks=("Could you share the order number and the date of the charge?",
              "Which order is this about?",
              "Can you confirm the order number and the last four digits of the card?"),
        details=("The order number is {order} and the charge was on {date}.",
                 "It's order {order}. The card ends in {last4}.",
                 "Order {order}, placed on {date}."),
        followups=(("How long until I see the money back?",
                    "Refunds usually appear within {days} business days, depending on your "
                    "bank."),
                   ("Will I get a confirmation email?",
                    "Yes, a confirmation for order {order} is on its way to your inbox.")),
        article=("Understanding charges on your Northwind Home statement", (
            "Charges from us appear as NORTHWIND HOME on your card statement.",
            "When you place an order we place a temporary authorization, which drops off "
            "within {days} business days.",
            "Subscriptions such as {plan} renew automatically at {plan_price} until you "
            "cancel them under Account > Subscriptions.",
            "You can download invoices for every order under Account > Orders.",
            "If you see a charge you don't recognize, contact support with the order number "
            "and the date of the charge.")),
    ),
    "shipping": _Category(
        issues=(
            _Issue(("Where is my order? It was supposed to arrive on {date}.",
                    "My {model} still hasn't arrived.",
                    "The tracking for my {noun} hasn't updated in {days} days."),
                   ("Your order {order} shipped with {carrier}, tracking number {tracking}. "
                    "It's in transit and should arrive within {days} business days.",
                    "I checked with {carrier}: order {order} is delayed at a sorting center and "
                    "is now expected within {days} business days. The tracking number is "
                    "{tracking}.")),
            _Issue(("Tracking says my order was delivered but nothing is here.",
                    "{carrier} marked my package as delivered on {date}, but I never got it.",
                    "My {noun} shows as delivered but it's not at my door."),
                   ("I'm sorry about that. I've opened a claim with {carrier} (case {case}) "
                    "and will send a replacement {model} if the package isn't found within 48 "
                    "hours.",
                    "I've filed a missing-package claim with {carrier}, case {case}. A "
                    "replacement {model} will ship at no cost if it doesn't turn up within two "
                    "days.")),
            _Issue(("Can I change the shipping address on my order?",
                    "I entered the wrong address for my {model} order.",
                    "Is it possible to upgrade my order to express shipping?"),
                   ("Order {order} hasn't shipped yet, so I've updated it. You'll get a new "
                    "confirmation email with the change.",
                    "I've made the change on order {order} before it left the warehouse. It "
                    "will ship within one business day.")),
            _Issue(("My {model} arrived with a cracked case.",
                    "The box was crushed and the {noun} inside is damaged.",
                    "The {noun} I received on {date} was broken in the package."),
                   ("I'm sorry it arrived damaged. A replacement {model} ships today at no "
                    "cost, and I've emailed you a prepaid return label for the damaged one.",
                    "That shouldn't happen. I've sent a free replacement for order {order}; "
                    "please return the damaged {noun} with the prepaid label within 30 days.")),
        ),
        asks=("What's your order number?",
              "Can you give me the order number so I can look it up?",
              "Could you confirm the order number and the delivery date you were given?"),
        details=("It's {order}.",
                 "The order number is {order}; it was due on {date}.",
                 "It's order {order}, shipped with {carrier}."),
        followups=(("Can I get text updates on the delivery?",
                    "Yes, you can turn on delivery notifications on the {carrier} tracking "
                    "page with tracking number {tracking}."),
                   ("Do I need to be home to sign for it?",
                    "No signature is needed for order {order}; the driver will leave it at "
                    "your door.")),
        article=("Tracking your Northwind Home order", (
            "Orders leave our warehouse within one business day.",
            "As soon as your order ships you get an email with the carrier and the tracking "
            "number.",
            "Standard delivery takes {days} business days; express delivery takes one to two.",
            "If tracking shows delivered but you have no package, check with your neighbors "
            "and contact us within 7 days so we can open a claim with the carrier.",
            "Damaged deliveries are replaced at no cost.")),
    ),
    "returns": _Category(
        issues=(
            _Issue(("I'd like to return my {model}.",
                    "How do I return the {noun} I bought?",
                    "The {product} isn't right for my home. Can I send it back?"),
                   ("You're within the 30-day return window, so I've emailed you a prepaid "
                    "return label for order {order}. Your refund of {price} is issued once the "
                    "{noun} reaches our warehouse.",
                    "No problem. I've started return {case} for order {order}; print the label "
                    "from your email and drop the {noun} off at any {carrier} location.")),
            _Issue(("I sent back my {model} two weeks ago and haven't been refunded.",
                    "When will I get my refund for the {noun} I returned?",
                    "{carrier} shows my return was delivered on {date}, but I have no refund "
                    "yet."),
                   ("Your return arrived on {date} and the refund of {price} was issued today. "
                    "It should reach your account within {days} business days.",
                    "I've checked return {case}: it passed inspection, and {price} is on its "
                    "way back to your card within {days} business days.")),
            _Issue(("Can I exchange my {model} for a different model?",
                    "I ordered the wrong {noun}. Can I swap it?",
                    "I want to exchange the {noun} I received."),
                   ("Sure. I've set up exchange {case}: the new one ships as soon as {carrier} "
                    "scans your return, and there's no extra charge.",
                    "I've created an exchange for order {order}. Send the {model} back with the "
                    "prepaid label and your replacement ships the day we receive it.")),
        ),
        asks=("What's the order number?",
              "Could you tell me the order number and why you're returning it?",
              "Which order is this for?"),
        details=("It's order {order}.",
                 "Order {order}. It just isn't what I expected.",
                 "The order number is {order}; it arrived on {date}."),
        followups=(("Do I need the original box?",
                    "The original box is nice but not required; any sturdy box works with the "
                    "prepaid label."),
                   ("Can I drop it off instead of scheduling a pickup?",
                    "Yes, you can drop it off at any {carrier} location with the label.")),
        article=("Returning a Northwind device", (
            "You can return any Northwind device within 30 days of delivery for a full refund.",
            "Start a return under Account > Orders and choose Return item.",
            "We email you a prepaid {carrier} label; any sturdy box works.",
            "Refunds go back to the original payment method within {days} business days after "
            "the device reaches our warehouse.",
            "Exchanges ship as soon as the carrier scans your return.")),
    ),
    "setup": _Category(
        issues=(
            _Issue(("I can't add my new {model} in the Northwind app.",
                    "The app doesn't find my {noun} during setup.",
                    "Setup of my {product} keeps failing at the last step."),
                   ("Let's start fresh: {reset}. Then {pair}. Keep your phone close to the "
                    "{noun} during setup.",
                    "Please make sure Bluetooth is on, then {reset}. After that, {pair}.")),
            _Issue(("How do I set up my {product}?",
                    "I just got a {model}. What are the steps to install it?",
                    "Is there a guide for installing the {model}?"),
                   ("Here's how: download the Northwind app, sign in, then {pair}. Setup takes "
                    "about five minutes.",
                    "First install the Northwind app and create an account. Then {pair}, and "
                    "the app walks you through the rest.")),
            _Issue(("How do I give my partner access to the {noun}?",
                    "Can my family control the {model} from their phones?",
                    "I want to share my {product} with my roommate."),
                   ("Open the app, go to Settings > Home members and tap Invite. They'll get "
                    "an email to join your home and control the {noun}.",
                    "Yes: in the app go to Settings > Home members > Invite. Everyone you "
                    "invite can control the {model} from their own account.")),
        ),
        asks=("Which model do you have, and where does setup stop?",
              "Can you tell me the model and what the app shows?",
              "Which model is it, and when did you buy it?"),
        details=("It's the {model} from order {order}. The app just says 'Device not found'.",
                 "I have the {model}, order {order}, and I'm using the latest app.",
                 "It's a {model}, order {order}, bought on {date}."),
        followups=(("Do I need a Northwind Hub for this?",
                    "No, the {model} connects directly to your Wi-Fi, so a hub is optional."),
                   ("Can I control it with my voice assistant?",
                    "Yes. In the app, go to Settings > Integrations and link your voice "
                    "assistant account.")),
        article=("Setting up your {product} ({model})", (
            "1. Download the Northwind app and sign in or create an account.",
            "2. {pair_cap}.",
            "3. Choose the room where the {noun} is installed.",
            "4. Wait while the {noun} installs the latest firmware; this takes about five "
            "minutes.",
            "If the app cannot find the {noun}, {reset} and try again.")),
    ),
    "connectivity": _Category(
        issues=(
            _Issue(("My {model} keeps going offline.",
                    "The app says my {noun} is unreachable.",
                    "My {product} disconnects from the Wi-Fi every few hours."),
                   ("Connection drops usually come from a weak signal. Move the {noun} closer "
                    "to your router or add a Northwind Mesh node, and make sure your router "
                    "has the 2.4 GHz band turned on.",
                    "Please restart your router, then {reset} and reconnect it: {pair}. If it "
                    "drops again, check that the 2.4 GHz band is enabled.")),
            _Issue(("I changed my Wi-Fi password and now the {noun} won't connect.",
                    "I got a new router and my {model} lost its connection.",
                    "My {product} stopped connecting after my internet provider came by."),
                   ("The {noun} needs the new Wi-Fi details. Open it in the app, tap Settings "
                    "> Wi-Fi network and enter the new password.",
                    "After a router change, {reset}, then {pair} and pick your new network.")),
            _Issue(("The {noun} responds very slowly in the app.",
                    "There's a long delay when I use my {model} away from home.",
                    "Commands to my {product} take ages to go through."),
                   ("A slow response usually means a weak signal. Check the signal under "
                    "Device > Info; below two bars, move the {noun} or the router closer "
                    "together.",
                    "Please update the {model} under Settings > Firmware and restart your "
                    "router. That clears most delays.")),
        ),
        asks=("How far is the {noun} from your router, and when did this start?",
              "Which model is it, and is the light on the device on or off?",
              "Has anything changed on your network recently?"),
        details=("It's the {model} from order {order}, two rooms away from the router. It "
                 "started on {date}.",
                 "The {model} (order {order}) is in the hallway and the light is blinking.",
                 "It's a {model}, order {order}. Nothing changed on my network."),
        followups=(("It works now, but will it happen again?",
                    "It shouldn't. If the {noun} drops again, the app notifies you and it "
                    "reconnects automatically."),
                   ("Does it work on 5 GHz?",
                    "The {model} uses 2.4 GHz for range, but it works fine with routers that "
                    "broadcast both bands.")),
        article=("Fixing connection problems with the {product}", (
            "The {model} connects to 2.4 GHz Wi-Fi; make sure that band is turned on.",
            "Keep the {noun} within two rooms of your router, or add a Northwind Mesh node.",
            "If you changed your Wi-Fi name or password, update it under Settings > Wi-Fi "
            "network.",
            "If the {noun} stays offline, {reset}, then {pair}.")),
    ),
    "warranty": _Category(
        issues=(
            _Issue(("My {model} stopped working after eight months. Is it covered by "
                    "warranty?",
                    "I'd like to make a warranty claim for my {noun}.",
                    "My {product} {symptom}. It's only a year old."),
                   ("Your {model} is covered by our two-year warranty. I've opened claim "
                    "{case} and a replacement will ship within {days} business days.",
                    "Good news: the {noun} is still under warranty. Claim {case} is approved, "
                    "and you'll get a prepaid label to send the old one back.")),
            _Issue(("How long is the warranty on the {model}?",
                    "Can I extend the warranty on my {noun}?",
                    "Does {plan} extend the warranty on the {model}?"),
                   ("Every Northwind device has a two-year limited warranty. {plan} extends it "
                    "to four years for {plan_price}.",
                    "The {model} comes with two years of coverage from the delivery date, and "
                    "{plan} adds two more years for {plan_price}.")),
            _Issue(("I got the {model} as a gift and don't have a receipt. Is it under "
                    "warranty?",
                    "The {noun} was a present. Can I still use the warranty?",
                    "I bought my {product} from another store. Does your warranty apply?"),
                   ("Yes. We can confirm the warranty with the serial number on the back of "
                    "the {noun}. I've opened case {case}; reply with a photo of the label.",
                    "Absolutely. Gifted and retail devices are covered too. Case {case} is "
                    "open, and we'll check the serial number for you.")),
        ),
        asks=("Could you share the order number and when the problem started?",
              "When did you buy it, and what's the order number?",
              "Can you describe what the {noun} is doing?"),
        details=("It was order {order}, delivered on {date}.",
                 "I bought it on {date}; the order was {order}.",
                 "Order {order}. It {symptom}."),
        followups=(("Do I need to send the old one back first?",
                    "No, we ship the replacement first. Just return the old {noun} within 30 "
                    "days with the prepaid label."),
                   ("Will the replacement also have a warranty?",
                    "Yes, the replacement is covered for the rest of the original warranty or "
                    "90 days, whichever is longer.")),
        article=("Northwind Home limited warranty", (
            "Every Northwind device, including the {model}, has a two-year limited warranty "
            "from the delivery date.",
            "The warranty covers defects in materials and workmanship, not accidental damage.",
            "{plan} extends coverage to four years for {plan_price}.",
            "To make a claim, contact support with your order number or the serial number on "
            "the device.",
            "We ship the replacement first and send a prepaid label for the old device.")),
    ),
    "account": _Category(
        issues=(
            _Issue(("I can't log in to my Northwind account.",
                    "I forgot my password and the reset email never arrives.",
                    "My account is locked after too many login attempts."),
                   ("I've sent a new password reset link to the email on your account. It "
                    "expires in 30 minutes, so please use it soon and check your spam folder.",
                    "Your account was locked for security. I've unlocked it; please reset "
                    "your password with the link I just sent.")),
            _Issue(("How do I change the email address on my account?",
                    "I need to update the name on my Northwind account.",
                    "Can I move my devices to a new account?"),
                   ("Go to Account > Profile in the app and tap Edit. We send a confirmation "
                    "link to confirm the change.",
                    "I've updated your account details; you'll get a confirmation message in "
                    "the app. Your devices stay connected.")),
            _Issue(("Please delete my Northwind account and my data.",
                    "How can I download the data you have about me?",
                    "I want to close my account."),
                   ("I've submitted the request (case {case}). Your account and device history "
                    "are removed within 30 days, and you'll get a confirmation email.",
                    "You can request a copy of your data under Account > Privacy > Download my "
                    "data. The file is ready within 48 hours.")),
            _Issue(("I got a new phone and can't get my two-factor codes.",
                    "How do I turn on two-factor authentication?",
                    "The app keeps asking for a verification code I never receive."),
                   ("I've reset two-factor authentication on your account. Sign in with your "
                    "password and the app will ask you to set it up on the new phone.",
                    "Go to Account > Security > Two-factor authentication and follow the "
                    "steps. Save the backup codes somewhere safe.")),
        ),
        asks=("For security, can you confirm the order number of one of your purchases?",
              "Could you tell me the name on the account and a recent order number?",
              "Can you confirm a recent order number so I can find your account?"),
        details=("The account is under {name}. My last order was {order}.",
                 "It's {name}, order {order}.",
                 "Order {order} from {date}."),
        followups=(("Will my devices still work while I fix this?",
                    "Yes, your devices keep running their schedules and automations; only the "
                    "app needs you to sign in."),
                   ("Can I use the same account on my tablet?",
                    "Yes, sign in with the same account on as many phones and tablets as you "
                    "like.")),
        article=("Managing your Northwind account", (
            "You can change your name, email and password under Account > Profile.",
            "Turn on two-factor authentication under Account > Security for extra protection.",
            "Invite family members under Settings > Home members instead of sharing your "
            "password.",
            "To download or delete your data, go to Account > Privacy.")),
    ),
    "firmware": _Category(
        issues=(
            _Issue(("The firmware update on my {model} failed.",
                    "My {noun} has been stuck on 'Updating' for hours.",
                    "After the latest update my {product} {symptom}."),
                   ("Please unplug the {noun} for 30 seconds and plug it back in; the update "
                    "resumes automatically. If it still fails, {reset} and set it up again.",
                    "A stuck update is usually a connection issue. Keep the {noun} in range of "
                    "your router and retry from Settings > Firmware in the app.")),
            _Issue(("Which firmware version should my {model} be on?",
                    "How do I check for updates on my {noun}?",
                    "Is there a new update for the {product}?"),
                   ("The latest firmware for the {model} is {fw}. You can check under Settings "
                    "> Firmware; updates install automatically overnight.",
                    "Open the {noun} in the app and go to Settings > Firmware. Version {fw} is "
                    "the current release for the {model}.")),
            _Issue(("Can I stop the {noun} from updating automatically?",
                    "The {model} updated overnight and I didn't want it to.",
                    "How do I turn off automatic updates on my {product}?"),
                   ("Yes. Open the {noun} in the app, go to Settings > Firmware and turn off "
                    "Automatic updates. We recommend keeping security updates on.",
                    "You can turn off Automatic updates under Settings > Firmware, but security "
                    "fixes for the {model} still install within 30 days.")),
        ),
        asks=("Which model is it, and what does the app show under Settings > Firmware?",
              "What version does the app show for the {noun}?",
              "When did the update start?"),
        details=("It's the {model} from order {order}; it says version {fw_old}.",
                 "The {model}, order {order}, and the app says 'Update failed'.",
                 "It started on {date}. The {model} is from order {order}."),
        followups=(("How long does an update usually take?",
                    "Most updates take five to ten minutes. The {noun} restarts once at the "
                    "end."),
                   ("Will I lose my settings?",
                    "No, firmware updates keep your settings, schedules and automations.")),
        article=("Firmware updates for the {model}", (
            "The current firmware for the {model} is {fw}.",
            "Updates install automatically overnight while the {noun} is idle.",
            "To update now, open the {noun} in the app and go to Settings > Firmware.",
            "If an update fails, unplug the {noun} for 30 seconds; the update resumes on its "
            "own.",
            "Updates keep your settings, schedules and automations.")),
    ),
    "cancellation": _Category(
        issues=(
            _Issue(("Please cancel my order.",
                    "I ordered the {model} by mistake. Can I cancel?",
                    "I want to cancel my {noun} order before it ships."),
                   ("Order {order} hadn't shipped yet, so I've cancelled it. The refund of "
                    "{price} reaches your card within {days} business days.",
                    "Done: order {order} is cancelled, and you'll get a confirmation email "
                    "shortly. No charge will go through.")),
            _Issue(("Can I still cancel? The email says my {model} shipped.",
                    "My order already shipped but I don't want the {noun} anymore.",
                    "Is it too late to cancel my {product} order?"),
                   ("Order {order} has already shipped, so I can't cancel it, but you can "
                    "refuse the delivery or return it for free within 30 days.",
                    "It's on its way with {carrier} already. Once it arrives, start a free "
                    "return under Account > Orders and you'll get a full refund of {price}.")),
            _Issue(("How do I cancel my {plan} subscription?",
                    "Please cancel {plan} on my account.",
                    "I don't want {plan} anymore."),
                   ("I've cancelled {plan}. You keep the benefits until the end of the current "
                    "billing period, and you won't be charged {plan_price} again.",
                    "{plan} is cancelled as of today; there are no further charges, and your "
                    "recordings stay available for 30 days.")),
        ),
        asks=("Could you give me the order number?",
              "Which order or subscription is this about?",
              "Can you confirm the order number for me?"),
        details=("It's {order}.",
                 "Order {order}, placed on {date}.",
                 "The order number is {order}."),
        followups=(("Will I get an email confirming this?",
                    "Yes, the confirmation for order {order} is already in your inbox."),
                   ("Can I order again later with the same discount?",
                    "Promotions change often, but I've added a note to your account for the "
                    "team.")),
        article=("Cancelling an order or subscription", (
            "You can cancel an order under Account > Orders until it ships.",
            "Once an order has shipped, refuse the delivery or return it within 30 days.",
            "Cancel {plan} under Account > Subscriptions; you keep the benefits until the end "
            "of the billing period.",
            "Refunds for cancelled orders take {days} business days.")),
    ),
    "hardware": _Category(
        issues=(
            _Issue(("My {model} {symptom}.",
                    "Hi, the {noun} {symptom} since {date}.",
                    "Help! My {product} {symptom}."),
                   ("Thanks for the details. Please {fix}. That solves this for most "
                    "customers.",
                    "Let's try this: {fix}. If the problem continues, {reset} and set it up "
                    "again.")),
            _Issue(("My {model} won't power on at all.",
                    "The {noun} gets very warm.",
                    "There's a strange smell coming from my {product}."),
                   ("Please try a different power adapter and outlet. If the {noun} still "
                    "doesn't power on, I'll set up a replacement under warranty (case {case}).",
                    "Please unplug the {noun} now and don't use it. I've opened case {case} to "
                    "replace it under warranty.")),
        ),
        asks=("When did this start, and have you changed anything recently?",
              "What model is it, and what does the light on the device show?",
              "How long has the {noun} been doing this?"),
        details=("It's the {model} from order {order}, and it started on {date}.",
                 "It's a {model}, order {order}. Nothing changed, it just started.",
                 "The {model} from order {order}. It started after a power cut."),
        followups=(("I tried that but it still {symptom}.",
                    "Thanks for trying. Please {reset}, then {pair}. If it still happens, I'll "
                    "send a replacement under warranty."),
                   ("That fixed it, thanks! Should I do anything to prevent it?",
                    "Keep the firmware up to date and the {noun} away from heat sources, and it "
                    "should stay reliable.")),
        article=("Troubleshooting the {product} ({model})", (
            "If your {noun} {symptom}, {fix}.",
            "Restart the {noun} by unplugging it for 30 seconds.",
            "If the problem continues, {reset}, then {pair}.",
            "Still stuck? Contact support with the serial number; the {model} has a two-year "
            "warranty.")),
    ),
}
_CATEGORY_KEYS = tuple(_CATEGORIES)

_SYSTEM = (
    "You are Nora, the support assistant for Northwind Home. Be friendly, concise and "
    "accurate.",
    "You are a helpful support agent for Northwind Home smart-home devices. Never ask for a "
    "full card number.",
    "Northwind Home customer support. Answer questions about orders, devices and accounts "
    "politely.",
    "You help Northwind Home customers with their devices, orders and subscriptions.",
)
_GREETINGS = ("Hi,", "Hello,", "Hey there.", "Good morning.", "Hi Northwind team,",
              "Hi, this is {name}.", "", "Hello.")
_OPENERS = ("Hi {first}, thanks for contacting Northwind Home support.",
            "Hello {first}! I'm {agent}, and I'll help you with this.",
            "Thanks for reaching out, {first}.",
            "Hi {first}, sorry to hear about the trouble.",
            "Hi {first}, {agent} here.")
_DETAIL_LEADS = ("Sure. ", "Yes, ", "", "Of course. ", "")
_ACKS = ("Thank you.", "Thanks, {first}.", "Got it.", "Thanks for confirming.", "")
_THANKS = ("Thanks, that's all I needed.", "Great, thank you!",
           "Perfect, thanks for the quick help.", "That worked. Thanks a lot!",
           "OK, thank you.")
_GOODBYES = ("You're welcome, {first}! Have a great day.", "Happy to help. Enjoy your {noun}!",
             "Glad I could help. Thanks for choosing Northwind Home.",
             "Anytime, {first}. Take care!")
_PAIR_COUNTS = (1, 2, 3, 4)  # user/assistant exchanges: 2 to 8 messages
_PAIR_WEIGHTS = (20, 40, 28, 12)

_EMAIL_SENTENCES = ("You can reach me at {email}.", "My email is {email} if you need it.",
                    "Please send the label to {email}.", "My account email is {email}.")
_PHONE_SENTENCES = ("Call me at {phone} if that's easier.", "My number is {phone}.",
                    "You can text me on {phone}.", "Best number to reach me: {phone}.")
_LOOKALIKE_SENTENCES = (
    "For reference: order {order}, placed {iso_date}, serial {serial}, firmware {fw}.",
    "My order {order} from {iso_date} had {qty} x {model} at {price} each.",
    "The label says serial {serial}, made {iso_date}.",
    "Receipt {order}, {iso_date} 14:05, total {price}.",
)
_UNKNOWN_ROLES = (("moderator", "Conversation transferred to tier 2 support."),
                  ("moderator", "Chat rating requested."),
                  ("supervisor", "Internal note: customer identity verified."),
                  ("internal", "Auto-tag: priority normal."))
_BLANKS = ("", " ", "   ", "\n", " \t ")
# Abuse that hygiene must quarantine: insults aimed at the other side of the conversation.
_ABUSE_USER = ("You people are useless idiots.", "Screw you and your garbage company.",
               "What kind of morons work there?", "Are you stupid or just pretending?",
               "This is the worst shit I have ever bought, you clowns.",
               "Shut up and give me my money back, you idiot.", "Go to hell, all of you.",
               "Your fucking app is useless.", "Stop wasting my time, you brainless moron.",
               "Fix this piece of crap or I'll trash your company everywhere.")
_ABUSE_AGENT = ("Stop whining and read the manual, idiot.", "Not my problem, moron.",
                "Shut up and wait like everyone else.")
# Angry but not abusive: normal support talk that hygiene must keep.
_COMPLAINTS = ("This is ridiculous, I want a refund.", "Honestly, this is unacceptable.",
               "I'm really frustrated, this is the third time I'm contacting you.",
               "This is the worst experience I've had with a company.",
               "I'm losing my patience here.", "I am fed up with this.",
               "This is absurd.", "I'm very disappointed with your service.",
               "Why is this so complicated? I just want it to work.",
               "I've been waiting for two weeks and nobody answers. This is not okay.")
# Small edits that keep a conversation a near-duplicate (planted "near_duplicate").
_SYNONYMS = {"Hi": "Hello", "Hello": "Hi", "Thanks": "Thank you", "thanks": "thank you",
             "order": "purchase", "please": "kindly", "Please": "Kindly", "can't": "cannot",
             "I've": "I have", "won't": "will not", "It's": "It is", "it's": "it is",
             "within": "in", "I'm": "I am", "sorry": "so sorry", "new": "brand-new"}
_ADDED_GREETINGS = ("Hi there,", "Hello!", "Good afternoon.", "Hey,")
# Conversations in other languages (planted "other_language"): user, agent, user, agent.
_FOREIGN: dict[str, tuple[str, tuple[str, str, str, str]]] = {
    "es": ("shipping", (
        "Hola, mi pedido {order} todavía no ha llegado. ¿Dónde está mi {model}?",
        "Hola {first}, gracias por escribirnos. Su pedido {order} salió con {carrier} y llegará "
        "en {days} días laborables.",
        "¿Puedo cambiar la dirección de entrega?",
        "Sí, ya he actualizado la dirección. Recibirá un correo de confirmación en unos "
        "minutos.")),
    "de": ("warranty", (
        "Guten Tag, mein {model} funktioniert seit gestern nicht mehr. Ist das noch Garantie?",
        "Hallo {first}, vielen Dank für Ihre Nachricht. Ihr Gerät hat zwei Jahre Garantie, "
        "und ich habe den Fall {case} für einen Ersatz eröffnet.",
        "Muss ich das alte Gerät zurückschicken?",
        "Ja, bitte schicken Sie es innerhalb von 30 Tagen mit dem kostenlosen Etikett "
        "zurück.")),
    "fr": ("billing", (
        "Bonjour, j'ai été débité deux fois pour la commande {order}. Pouvez-vous vérifier ?",
        "Bonjour {first}, merci de nous avoir contactés. J'ai trouvé le double paiement et je "
        "vous ai remboursé {price}.",
        "Combien de temps faut-il pour voir le remboursement ?",
        "Le remboursement apparaît sur votre carte sous {days} jours ouvrés, selon votre "
        "banque.")),
    "it": ("setup", (
        "Buongiorno, non riesco ad aggiungere il mio nuovo {model} nell'app Northwind.",
        "Ciao {first}, grazie per averci scritto. Tieni il telefono vicino al dispositivo e "
        "riavvia la configurazione dall'app.",
        "Ho bisogno di un hub per farlo funzionare?",
        "No, il dispositivo si collega direttamente al tuo Wi-Fi, quindi l'hub è "
        "facoltativo.")),
    "pt": ("returns", (
        "Olá, quero devolver o meu {model}. Não é o que eu esperava.",
        "Olá {first}, obrigado pelo contato. Enviei uma etiqueta de devolução pré-paga para "
        "o pedido {order}.",
        "Preciso da caixa original?",
        "Não é obrigatório; qualquer caixa resistente serve com a etiqueta pré-paga.")),
}
# fmt: on
_SYSTEM_RATE = 0.25
_LOOKALIKE_RATE = 0.05
_COMPLAINT_RATE = 0.04  # clean conversations whose customer is angry but not abusive
_AGENT_ABUSE_RATE = 0.25  # planted abuse from the agent rather than the customer


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _slots(rng: random.Random) -> tuple[str, dict[str, str]]:
    """Pick a product and every value a template may name; returns (product line, slots)."""
    key = rng.choice(_PRODUCT_KEYS)
    p = _PRODUCTS[key]
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    month, day = rng.randrange(12), rng.randrange(1, 29)
    plan, plan_price = rng.choice(_PLANS)
    m = rng.randrange(2)
    s = {
        "first": first,
        "name": f"{first} {last}",
        "last": last,
        "agent": rng.choice(_AGENTS),
        "product": p["product"],
        "noun": p["noun"],
        "model": p["models"][m],
        "price": p["prices"][m],
        "reset": p["reset"],
        "pair": p["pair"],
        "fix": p["fix"],
        "symptom": rng.choice(p["symptoms"]),
        "order": f"NW-{rng.randrange(100_000, 1_000_000)}",
        "case": str(rng.randrange(10_000, 100_000)),
        "date": f"{_MONTHS[month]} {day}",
        "iso_date": f"2024-{month + 1:02d}-{day:02d}",
        "days": rng.choice(("3", "5", "7")),
        "carrier": rng.choice(_CARRIERS),
        "tracking": f"1Z{rng.randrange(10**15):015d}",
        "last4": f"{rng.randrange(10_000):04d}",
        "plan": plan,
        "plan_price": plan_price,
        "fw": f"{rng.randrange(3, 6)}.{rng.randrange(10)}.{rng.randrange(1, 20)}",
        "fw_old": f"{rng.randrange(1, 3)}.{rng.randrange(10)}.{rng.randrange(1, 20)}",
    }
    s["pair_cap"] = _cap(s["pair"])
    return key, s


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _conversation(rng: random.Random, category: str, s: dict[str, str]) -> list[list[Any]]:
    """A clean support conversation: optional system turn, then 1-4 user/assistant exchanges."""
    cat = _CATEGORIES[category]
    issue = rng.choice(cat.issues)
    msgs: list[list[Any]] = []
    if rng.random() < _SYSTEM_RATE:
        msgs.append(["system", rng.choice(_SYSTEM)])
    pairs = rng.choices(_PAIR_COUNTS, _PAIR_WEIGHTS)[0]
    greeting = rng.choice(_GREETINGS).format_map(s)
    problem = rng.choice(issue.problems).format_map(s)
    detail = rng.choice(cat.details).format_map(s)
    resolution = rng.choice(issue.resolutions).format_map(s)
    opener = rng.choice(_OPENERS).format_map(s)
    if pairs == 1:
        msgs.append(["user", _join(greeting, problem, detail)])
        msgs.append(["assistant", _join(opener, resolution)])
        return msgs
    msgs.append(["user", _join(greeting, problem)])
    msgs.append(["assistant", _join(opener, rng.choice(cat.asks).format_map(s))])
    msgs.append(["user", rng.choice(_DETAIL_LEADS) + detail])
    msgs.append(["assistant", _join(rng.choice(_ACKS).format_map(s), resolution)])
    if pairs >= 3 and (pairs == 4 or rng.random() < 0.6):
        question, answer = rng.choice(cat.followups)
        msgs.append(["user", question.format_map(s)])
        msgs.append(["assistant", answer.format_map(s)])
    if len(msgs) - (msgs[0][0] == "system") < pairs * 2:
        msgs.append(["user", rng.choice(_THANKS)])
        msgs.append(["assistant", rng.choice(_GOODBYES).format_map(s)])
    return msgs


def _pair(rng: random.Random, category: str, s: dict[str, str]) -> tuple[str, str]:
    """A single-turn FAQ pair: a customer question with context, and the answer."""
    cat = _CATEGORIES[category]
    issue = rng.choice(cat.issues)
    prompt = _join(rng.choice(issue.problems), rng.choice(cat.details)).format_map(s)
    return prompt, rng.choice(issue.resolutions).format_map(s)


def _article(rng: random.Random, category: str, s: dict[str, str], number: int) -> str:
    """A knowledge-base article: title, an id line (unique), then body lines, no blank line."""
    title, body = _CATEGORIES[category].article
    lines = [title.format_map(s), f"Article KB-{10_000 + number} | Updated {s['iso_date']}"]
    lines += [line.format_map(s) for i, line in enumerate(body) if i == 0 or rng.random() < 0.85]
    return "\n".join(lines)


def _log_paste(rng: random.Random, s: dict[str, str]) -> str:
    """A diagnostic log a customer pastes: long, but with no digit groups that look like PII."""
    lines = ["Here is the full diagnostic log from the app:"]
    size, t = len(lines[0]), rng.randrange(86_400)
    target = rng.randrange(_OVERLONG_MIN_CHARS, 6_500)
    events = (
        "wifi: reconnect attempt {n} rssi=-{r}",
        "cloud: heartbeat missed seq={q}",
        "ota: download chunk {n}/{c} ok",
        "sensor: reading {r}.{n} C",
        "zigbee: retry in {n}s",
    )
    while size < target:
        t += rng.randrange(1, 90)
        event = rng.choice(events).format(
            n=rng.randrange(1, 40),
            r=rng.randrange(40, 90),
            q=rng.randrange(10**6),
            c=rng.randrange(40, 99),
        )
        line = (
            f"{s['iso_date']}T{t // 3600 % 24:02d}:{t // 60 % 60:02d}:{t % 60:02d}Z "
            f"{s['model']} {event}"
        )
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def _long_article(rng: random.Random, s: dict[str, str], number: int) -> str:
    """A troubleshooting guide past the message size limit (still no blank lines)."""
    steps = [
        line
        for cat in ("setup", "connectivity", "hardware", "firmware")
        for line in _CATEGORIES[cat].article[1]
    ]
    lines = [
        f"Complete troubleshooting guide for the {s['product']} ({s['model']})",
        f"Article KB-{10_000 + number} | Updated {s['iso_date']}",
    ]
    size, target = 0, rng.randrange(_OVERLONG_MIN_CHARS, 7_000)
    while size < target:
        step = rng.choice(steps).format_map(s).lstrip("0123456789. ")
        line = f"Step {len(lines) - 1}: {_cap(step)}"
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def _email(rng: random.Random, s: dict[str, str]) -> str:
    first, last = s["first"].lower(), s["last"].lower()
    local = rng.choice(
        (
            f"{first}.{last}",
            f"{first}{rng.randrange(10, 99)}",
            f"{first[0]}{last}",
            f"{first}_{last}",
        )
    )
    # Names such as "Zoë" would make a local part the pattern set cannot see as an address.
    local = local.encode("ascii", "ignore").decode()
    return f"{local}@{rng.choice(_EMAIL_DOMAINS)}"


def _phone(rng: random.Random) -> str:
    area, line = rng.choice(("415", "212", "312", "646", "503")), rng.randrange(100, 200)
    return rng.choice(
        (
            f"+1 ({area}) 555-{line:04d}",
            f"{area}-555-{line:04d}",
            f"+44 20 7946 {line:04d}",
            f"({area}) 555 {line:04d}",
            f"{area}.555.{line:04d}",
            f"+1 {area} 555 {line:04d}",
        )
    )


def _luhn_digit(digits: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str(-total % 10)


def _sensitive(rng: random.Random) -> str:
    """A sentence with one valid card number, IBAN, IP address, US SSN or API key."""
    kind = rng.choice(("card", "iban", "ip", "ssn", "secret"))
    if kind == "card":
        body = "4" + "".join(rng.choice("0123456789") for _ in range(14))
        number = body + _luhn_digit(body)
        sep = rng.choice((" ", "-", ""))
        value = sep.join(number[i : i + 4] for i in range(0, 16, 4))
        sentence = rng.choice(("My card number is {v}.", "Please charge the card {v} instead."))
        return sentence.format(v=value)
    if kind == "iban":
        bban = "".join(rng.choice("0123456789") for _ in range(18))
        check = 98 - int(bban + "131400") % 97  # "DE00" with D=13, E=14, moved to the end
        iban = f"DE{check:02d}{bban}"
        value = " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))
        return f"Please refund it to my IBAN {value}."
    if kind == "ip":
        value = rng.choice(
            (f"203.0.113.{rng.randrange(1, 255)}", f"2001:db8::{rng.randrange(1, 65535):x}")
        )
        return f"My router's public IP address is {value}, if that helps."
    if kind == "ssn":
        area = rng.choice([a for a in range(100, 666) if a != 666])
        value = f"{area}-{rng.randrange(10, 100)}-{rng.randrange(1000, 10_000)}"
        return f"The form asked for my SSN, it is {value}."
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
    token = "".join(rng.choice(alphabet) for _ in range(32))
    return f"Here is the API key of my integration: sk_live_{token}"


def _lookalike(rng: random.Random, s: dict[str, str]) -> str:
    a, b, c = rng.randrange(1000, 10_000), rng.randrange(1000, 10_000), rng.randrange(10, 99)
    serial = f"NWS-{a}-{b}-{c}"
    return rng.choice(_LOOKALIKE_SENTENCES).format_map(
        {**s, "serial": serial, "qty": str(rng.randrange(2, 5))}
    )


def _user_indices(msgs: list[list[Any]]) -> list[int]:
    return [i for i, m in enumerate(msgs) if m[0] == "user"]


def _plant(
    rng: random.Random, kind: str, msgs: list[list[Any]], s: dict[str, str], chat: bool
) -> bool:
    """Apply one content defect to a clean conversation in place; True means the chat line
    must also lose its "messages" key (a missing field only JSON lines can have)."""
    users = _user_indices(msgs)
    if kind == "email":
        i = rng.choice(users)
        msgs[i][1] = _join(msgs[i][1], rng.choice(_EMAIL_SENTENCES).format(email=_email(rng, s)))
    elif kind == "phone":
        i = rng.choice(users)
        msgs[i][1] = _join(msgs[i][1], rng.choice(_PHONE_SENTENCES).format(phone=_phone(rng)))
    elif kind == "sensitive":
        i = rng.choice(users)
        msgs[i][1] = _join(msgs[i][1], _sensitive(rng))
    elif kind == "overlong":
        i = rng.choice(users)
        msgs[i][1] = msgs[i][1] + "\n" + _log_paste(rng, s)
    elif kind == "empty_turn":
        i = rng.choice([j for j, m in enumerate(msgs) if m[0] != "system"])
        msgs[i][1] = rng.choice(_BLANKS)
    elif kind == "unknown_role":
        role, note = rng.choice(_UNKNOWN_ROLES)
        msgs.insert(rng.randrange(1, len(msgs) + 1), [role, note])
    elif kind == "missing_field":
        # Chat lines lose a message's role or content or the whole list; table rows, the role.
        field = rng.randrange(3) if chat else 0
        if field == 2:
            return True
        msgs[rng.randrange(len(msgs))][field] = None
    return False


def _swap_word(rng: random.Random, text: str) -> str:
    """One word replaced by a synonym, or one filler word added where none applies."""
    tokens = text.split(" ")
    known = [i for i, t in enumerate(tokens) if t.strip(".,!?") in _SYNONYMS]
    if known:
        i = rng.choice(known)
        core = tokens[i].strip(".,!?")
        tokens[i] = tokens[i].replace(core, _SYNONYMS[core], 1)
    else:
        tokens.insert(rng.randrange(1, len(tokens) + 1), "just")
    return " ".join(tokens)


def paraphrase(rng: random.Random, msgs: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """A near-duplicate of a conversation: one to three small edits (a changed word,
    punctuation, a lowercased message, a greeting added), never identical to the original."""
    out = [list(m) for m in msgs]
    spoken = [i for i, m in enumerate(out) if m[0] != "system"]
    users = _user_indices(out)
    for edit in rng.sample(("word", "punctuation", "casing", "greeting"), rng.randint(1, 3)):
        if edit == "word":
            i = rng.choice(spoken)
            out[i][1] = _swap_word(rng, out[i][1])
        elif edit == "punctuation":
            i = rng.choice(spoken)
            text = out[i][1]
            out[i][1] = rng.choice(
                (text.replace(",", ""), text.replace(". ", "... ", 1), text.rstrip(".!?") + "!")
            )
        elif edit == "casing":
            i = rng.choice(users)
            out[i][1] = out[i][1].lower()
        else:
            out[users[0]][1] = _join(rng.choice(_ADDED_GREETINGS), out[users[0]][1])
    if out == [list(m) for m in msgs]:  # every edit happened to change nothing
        out[users[0]][1] = _join(rng.choice(_ADDED_GREETINGS), out[users[0]][1])
    return out


def _abuse(rng: random.Random, msgs: list[list[Any]]) -> None:
    """Make one message abusive: mostly the customer's, sometimes the agent's."""
    agents = [i for i, m in enumerate(msgs) if m[0] == "assistant"]
    if agents and rng.random() < _AGENT_ABUSE_RATE:
        i = rng.choice(agents)
        msgs[i][1] = _join(rng.choice(_ABUSE_AGENT), msgs[i][1])
    else:
        i = rng.choice(_user_indices(msgs))
        insult = rng.choice(_ABUSE_USER)
        msgs[i][1] = _join(insult, msgs[i][1]) if rng.random() < 0.5 else _join(msgs[i][1], insult)


def _foreign(rng: random.Random, s: dict[str, str]) -> tuple[str, list[list[Any]]]:
    """A short support conversation in another language; returns (category, messages)."""
    category, turns = _FOREIGN[rng.choice(tuple(_FOREIGN))]
    n = rng.choice((2, 4))
    roles = ("user", "assistant", "user", "assistant")
    return category, [[r, t.format_map(s)] for r, t in zip(roles[:n], turns[:n], strict=True)]


class _ChatJsonl:
    """support_chats.jsonl: one conversation object per line; binary, for the cp1252 line."""

    def __init__(self, out_dir: Path) -> None:
        self.rel = CHAT_FILE
        self._f: IO[bytes] = open(out_dir / CHAT_FILE, "wb")  # noqa: SIM115 (closed in close())

    def write(
        self,
        rng: random.Random,
        index: int,
        msgs: list[list[Any]],
        category: str,
        product: str,
        kind: str | None,
        drop_messages: bool,
    ) -> None:
        obj: dict[str, Any] = {}
        if not drop_messages:
            obj["messages"] = [
                {k: v for k, v in (("role", r), ("content", c)) if v is not None} for r, c in msgs
            ]
        obj["category"] = category
        obj["product"] = product
        obj["conversation_id"] = f"chat-{index + 1:07d}"
        line = json.dumps(obj, ensure_ascii=False)
        if kind == "truncated_json":
            # An export that died mid-write: a strict prefix of an object is never valid JSON.
            cut = rng.randrange(len(line) // 4, len(line) * 3 // 4)
            self._f.write(line[:cut].encode("utf-8") + b"\n")
        elif kind == "invalid_utf8":
            self._f.write(line.encode("cp1252", errors="replace") + b"\n")
        else:
            self._f.write(line.encode("utf-8") + b"\n")

    def close(self) -> None:
        self._f.close()


def _iso_z(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _iso_eastern(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S-05:00", time.gmtime(t - 5 * 3600))


class _LongTable:
    """CSV/TSV, one row per message: conversation_id, role, text, timestamp."""

    def __init__(
        self,
        path: Path,
        rel: str,
        delimiter: str,
        lineterminator: str,
        roles: dict[str, str],
        stamp: Callable[[int], str],
        id_format: str,
    ) -> None:
        self.rel = rel
        self._f = open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115
        self._w = csv.writer(self._f, delimiter=delimiter, lineterminator=lineterminator)
        self._w.writerow(["conversation_id", "role", "text", "timestamp", "category"])
        self._roles, self._stamp, self._id = roles, stamp, id_format

    def write(self, rng: random.Random, index: int, msgs: list[list[Any]], category: str) -> None:
        cid = self._id.format(index + 1)
        t = _EPOCH_2024 + rng.randrange(365 * 86_400)
        for role, content in msgs:
            t += rng.randrange(15, 400)
            name = "" if role is None else self._roles.get(role, role)
            text = "" if content is None else content
            self._w.writerow([cid, name, text, self._stamp(t), category])

    def close(self) -> None:
        self._f.close()


class _ParquetLong:
    """chat_archive.parquet: the long layout as string columns, written in row groups."""

    _SCHEMA = pa.schema(
        [
            ("conversation_id", pa.string()),
            ("role", pa.string()),
            ("text", pa.string()),
            ("timestamp", pa.string()),
            ("category", pa.string()),
        ]
    )

    def __init__(self, out_dir: Path) -> None:
        self.rel = PARQUET_FILE
        self._writer = pq.ParquetWriter(out_dir / PARQUET_FILE, self._SCHEMA)
        self._cols: dict[str, list[str | None]] = {n: [] for n in self._SCHEMA.names}

    def write(self, rng: random.Random, index: int, msgs: list[list[Any]], category: str) -> None:
        cid = f"arch-{index + 1:06d}"
        t = _EPOCH_2024 + rng.randrange(365 * 86_400)
        for role, content in msgs:
            t += rng.randrange(15, 400)
            self._cols["conversation_id"].append(cid)
            self._cols["role"].append(role)
            self._cols["text"].append(content)
            self._cols["timestamp"].append(_iso_z(t))
            self._cols["category"].append(category)
        if len(self._cols["role"]) >= _PARQUET_BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._cols["role"]:
            self._writer.write_table(pa.table(self._cols, schema=self._SCHEMA))
            self._cols = {n: [] for n in self._SCHEMA.names}

    def close(self) -> None:
        self._flush()
        self._writer.close()


class _FaqJsonl:
    def __init__(self, out_dir: Path) -> None:
        self.rel = FAQ_FILE
        self._f = open(out_dir / FAQ_FILE, "w", encoding="utf-8", newline="\n")  # noqa: SIM115

    def write(self, pair: dict[str, str]) -> None:
        self._f.write(json.dumps(pair, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._f.close()


class _KnowledgeBase:
    """kb/<category>.txt: articles separated by one blank line; files opened on first use."""

    def __init__(self, out_dir: Path) -> None:
        self._dir = out_dir / KB_DIR
        self._files: dict[str, IO[str]] = {}

    def rel(self, category: str) -> str:
        return f"{KB_DIR}/{category}.txt"

    def write(self, category: str, text: str) -> None:
        f = self._files.get(category)
        if f is None:
            self._dir.mkdir(parents=True, exist_ok=True)
            f = open(self._dir / f"{category}.txt", "w", encoding="utf-8", newline="\n")  # noqa: SIM115
            self._files[category] = f
        else:
            f.write("\n")
        f.write(text + "\n")

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainder: exact, deterministic)."""
    wsum = sum(weights)
    if total <= 0 or wsum <= 0:
        return [0] * len(weights)
    raw = [total * w / wsum for w in weights]
    out = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def _plan_kinds(n_defects: int, kinds: Sequence[str]) -> dict[str, int]:
    """How many of each defect kind a file gets; every kind at least once when there is room."""
    counts = dict(
        zip(kinds, _allocate(n_defects, [_DEFECT_WEIGHTS[k] for k in kinds]), strict=True)
    )
    if n_defects >= len(kinds):
        for k in kinds:
            while counts[k] == 0:
                donor = max(kinds, key=lambda d: (counts[d], -kinds.index(d)))
                counts[donor] -= 1
                counts[k] += 1
    return counts


def _draw(rng: random.Random, left: dict[str, int]) -> str:
    pick = rng.randrange(sum(left.values()))
    for kind, n in left.items():
        if pick < n:
            left[kind] -= 1
            return kind
        pick -= n
    raise AssertionError("unreachable: pick < total")


class _Pool:
    """A bounded reservoir of clean units: planted duplicates copy one of them."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.seen = 0

    def offer(self, rng: random.Random, item: Any) -> None:
        self.seen += 1
        if len(self.items) < _POOL_SIZE:
            self.items.append(item)
        else:
            j = rng.randrange(self.seen)
            if j < _POOL_SIZE:
                self.items[j] = item


def generate(cfg: SampleParams, seed: int, out_dir: Path) -> SampleResult:
    """Write `cfg.conversations` units (conversations, FAQ pairs, articles) into `out_dir`:
    chat JSONL, CSV, TSV, Parquet, prompt/completion JSONL and kb/*.txt. Streams; the same
    (cfg, seed) always gives the same bytes."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_units = _allocate(cfg.conversations, [s.share for s in _SINKS])
    n_defects = _allocate(round(cfg.defect_rate * cfg.conversations), n_units)
    # The first unit of each file stays clean (it seeds the duplicate pool), so at most n - 1.
    n_defects = [min(d, max(n - 1, 0)) for d, n in zip(n_defects, n_units, strict=True)]

    per_file: Counter[str] = Counter()
    defects_per_file: dict[str, Counter[str]] = {}
    categories: Counter[str] = Counter()
    lookalikes = complaints = 0
    conv_pool, pair_pool, article_pool = _Pool(), _Pool(), _Pool()
    done, started = 0, time.perf_counter()

    for sink, n, d in zip(_SINKS, n_units, n_defects, strict=True):
        if n == 0:
            continue
        writer = _open_writer(sink.key, out_dir)
        left = _plan_kinds(d, sink.defects)
        remaining = d
        try:
            for k in range(n):
                kind = None
                # Selection sampling: exactly `d` defective units, spread evenly at random.
                if k > 0 and remaining and rng.random() * (n - k) < remaining:
                    kind = _draw(rng, left)
                    remaining -= 1
                if sink.unit == "conversation":
                    category, rel, clean, angry = _write_conversation(
                        rng, sink.key, writer, k, kind, conv_pool
                    )
                    lookalikes += clean
                    complaints += angry
                elif sink.unit == "pair":
                    category, rel = _write_pair(rng, writer, kind, pair_pool)
                else:
                    category, rel = _write_article(rng, writer, k, kind, article_pool)
                per_file[rel] += 1
                categories[category] += 1
                if kind is not None:
                    defects_per_file.setdefault(rel, Counter())[kind] += 1
                done += 1
                if done % _PROGRESS_EVERY == 0:
                    print(
                        f"sample: {done:,} / {cfg.conversations:,} conversations "
                        f"({time.perf_counter() - started:.0f} s)",
                        flush=True,
                    )
        finally:
            writer.close()

    files = tuple(out_dir / rel for rel in sorted(per_file))
    totals: Counter[str] = Counter()
    for c in defects_per_file.values():
        totals.update(c)
    return SampleResult(
        out_dir=out_dir,
        files=files,
        conversations=sum(per_file.values()),
        conversations_per_file={rel: per_file[rel] for rel in sorted(per_file)},
        defects={k: totals[k] for k in DEFECT_KINDS},
        defects_per_file={
            rel: {k: c[k] for k in DEFECT_KINDS if c[k]}
            for rel, c in sorted(defects_per_file.items())
        },
        categories={c: categories[c] for c in _CATEGORY_KEYS if categories[c]},
        lookalikes=lookalikes,
        complaints=complaints,
    )


def _open_writer(key: str, out_dir: Path) -> Any:
    if key == "chat":
        return _ChatJsonl(out_dir)
    if key == "csv":
        return _LongTable(out_dir / CSV_FILE, CSV_FILE, ",", "\r\n", {}, _iso_z, "HD-{:06d}")
    if key == "tsv":
        # Agent-desk exports name the speakers; ingest.role_map maps them back.
        return _LongTable(
            out_dir / TSV_FILE,
            TSV_FILE,
            "\t",
            "\n",
            {"user": "customer", "assistant": "agent"},
            _iso_eastern,
            "T{:06d}",
        )
    if key == "parquet":
        return _ParquetLong(out_dir)
    if key == "faq":
        return _FaqJsonl(out_dir)
    return _KnowledgeBase(out_dir)


def _write_conversation(
    rng: random.Random, key: str, writer: Any, index: int, kind: str | None, pool: _Pool
) -> tuple[str, str, int, int]:
    """Build (or copy) one conversation, plant `kind`, write it; returns category, file,
    1 if a non-PII look-alike was planted, and 1 if an angry-but-polite complaint was."""
    drop_messages = False
    lookalike = complaint = 0
    if kind == "duplicate":
        category, product, frozen = rng.choice(pool.items)
        msgs = [list(m) for m in frozen]
    elif kind == "near_duplicate":
        # Taken out of the pool (all but the last): two edits of one original could come out
        # identical, and ingest would count the second as an exact duplicate.
        j = rng.randrange(len(pool.items))
        category, product, frozen = pool.items.pop(j) if len(pool.items) > 1 else pool.items[j]
        msgs = paraphrase(rng, frozen)
    elif kind == "other_language":
        product, s = _slots(rng)
        category, msgs = _foreign(rng, s)
    else:
        category = rng.choice(_CATEGORY_KEYS)
        product, s = _slots(rng)
        msgs = _conversation(rng, category, s)
        if kind is None:
            if rng.random() < _COMPLAINT_RATE:
                i = _user_indices(msgs)[0]
                msgs[i][1] = _join(rng.choice(_COMPLAINTS), msgs[i][1])
                complaint = 1
            if rng.random() < _LOOKALIKE_RATE:
                i = rng.choice(_user_indices(msgs))
                msgs[i][1] = _join(msgs[i][1], _lookalike(rng, s))
                lookalike = 1
            pool.offer(rng, (category, product, tuple(tuple(m) for m in msgs)))
        elif kind == "abusive":
            _abuse(rng, msgs)
        elif kind not in _LINE_DEFECTS:
            drop_messages = _plant(rng, kind, msgs, s, chat=key == "chat")
        elif kind == "invalid_utf8":
            i = _user_indices(msgs)[-1]
            msgs[i][1] = _join(msgs[i][1], f"— {rng.choice(('René', 'Zoë', 'Sébastien'))}")
    if key == "chat":
        writer.write(rng, index, msgs, category, product, kind, drop_messages)
    else:
        writer.write(rng, index, msgs, category)
    return category, writer.rel, lookalike, complaint


def _write_pair(
    rng: random.Random, writer: _FaqJsonl, kind: str | None, pool: _Pool
) -> tuple[str, str]:
    if kind == "duplicate":
        category, items = rng.choice(pool.items)
        writer.write(dict(items))
        return category, writer.rel
    category = rng.choice(_CATEGORY_KEYS)
    _, s = _slots(rng)
    prompt, completion = _pair(rng, category, s)
    pair: dict[str, str] = {"prompt": prompt, "completion": completion, "category": category}
    if kind is None:
        pool.offer(rng, (category, tuple(pair.items())))
    elif kind in ("email", "phone", "sensitive", "overlong"):
        msgs = [["user", prompt], ["assistant", completion]]
        _plant(rng, kind, msgs, s, chat=False)
        pair["prompt"] = msgs[0][1]
    elif kind == "empty_turn":
        pair[rng.choice(("prompt", "completion"))] = rng.choice(_BLANKS)
    elif kind == "missing_field":
        del pair[rng.choice(("prompt", "completion"))]
    writer.write(pair)
    return category, writer.rel


def _write_article(
    rng: random.Random, writer: _KnowledgeBase, index: int, kind: str | None, pool: _Pool
) -> tuple[str, str]:
    if kind == "duplicate":
        category, text = rng.choice(pool.items)
    else:
        category = rng.choice(_CATEGORY_KEYS)
        _, s = _slots(rng)
        if kind == "overlong":
            text = _long_article(rng, s, index)
        else:
            text = _article(rng, category, s, index)
            pool.offer(rng, (category, text))
    writer.write(category, text)
    return category, writer.rel(category)


def existing_data(folder: Path) -> list[Path]:
    """Files under `folder` (recursively), ignoring dotfiles and dot-folders such as .gitkeep."""
    if not folder.exists():
        return []
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def run(params: Params) -> SampleResult | None:
    """Edge: write the sample corpus into `paths.incoming` unless it already holds data (then
    print why and return None: a user's files are never overwritten); writes reports/sample.json."""
    incoming = params.paths.incoming
    found = existing_data(incoming)
    if found:
        print(
            f"sample: skipped, {incoming} already holds data ({len(found)} file(s), e.g. "
            f"{found[0].relative_to(incoming)}); empty it to get the sample corpus",
            flush=True,
        )
        return None
    # Write beside the folder and move in at the end: an interrupted run leaves no half corpus
    # in `incoming` that a later run would mistake for the user's data.
    partial = incoming.parent / f".{incoming.name}.sample-partial"
    shutil.rmtree(partial, ignore_errors=True)
    started = time.perf_counter()
    result = generate(params.sample, params.seed, partial)
    incoming.mkdir(parents=True, exist_ok=True)
    for entry in sorted(partial.iterdir()):
        os.replace(entry, incoming / entry.name)
    partial.rmdir()
    result = replace(
        result,
        out_dir=incoming,
        files=tuple(incoming / p.relative_to(partial) for p in result.files),
    )
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in result.files)
    write_json(
        params.paths.reports / "sample.json",
        {
            "conversations": result.conversations,
            "files": result.conversations_per_file,
            "defects": result.defects,
            "categories": result.categories,
            "lookalikes": result.lookalikes,
            "complaints": result.complaints,
            "bytes": size,
        },
    )
    planted = ", ".join(f"{k} {v}" for k, v in result.defects.items() if v)
    print(
        f"sample: wrote {result.conversations:,} conversations to {incoming} in "
        f"{len(result.files)} files ({size / 1e6:.1f} MB, {seconds:.1f} s)",
        flush=True,
    )
    grouped: Counter[str] = Counter()
    for rel, n in result.conversations_per_file.items():
        folder, _, name = rel.rpartition("/")
        grouped[f"{folder}/*{Path(name).suffix}" if folder else rel] += n
    for rel, n in grouped.items():
        print(f"sample:   {rel}: {n:,}", flush=True)
    print(f"sample: planted defects: {planted or 'none'}", flush=True)
    return result


sample_task = stage_task(run, name="sample")

if __name__ == "__main__":
    stage_main(run)
