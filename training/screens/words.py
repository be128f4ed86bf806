"""Small built-in word and name lists the screens draw their text from."""

from __future__ import annotations

import random

FIRST_NAMES = (
    "Maria", "James", "Aisha", "Wei", "Olivia", "Mateo", "Priya", "Noah", "Fatima", "Liam", "Sofia", "Ethan",
    "Hana", "Lucas", "Grace", "Omar", "Elena", "Daniel", "Chloe", "Kenji", "Amara", "Samuel", "Nadia", "Henry",
    "Leah", "Ravi", "Isabel", "Marcus", "Yuki", "Clara", "Tomas", "Ingrid", "Victor", "Zoe", "Andre", "Mei",
)
LAST_NAMES = (
    "Lopez", "Smith", "Patel", "Chen", "Johnson", "Garcia", "Nguyen", "Okafor", "Kim", "Müller", "Rossi",
    "Haddad", "Novak", "Brown", "Silva", "Tanaka", "Cohen", "Ivanova", "Walker", "Dubois", "Khan", "Martin",
    "Larsen", "Reyes", "Schmidt", "Hughes", "Moreau", "Wright", "Sato", "Bianchi", "Fischer", "Adams", "Park",
)
SPECIALTIES = (
    "Cardiology", "Dermatology", "Family Medicine", "Pediatrics", "Orthopedics", "Neurology", "Radiology",
    "Internal Medicine", "Oncology", "Psychiatry", "Ophthalmology", "Gastroenterology", "Endocrinology",
    "Obstetrics", "Urology", "Physical Therapy",
)
CITIES = (
    "Springfield, IL", "Riverside, CA", "Madison, WI", "Salem, OR", "Franklin, TN", "Georgetown, TX",
    "Fairview, NJ", "Clinton, IA", "Arlington, VA", "Dayton, OH", "Aurora, CO", "Lakewood, WA",
    "Greenville, SC", "Burlington, VT", "Columbia, MO", "Ashland, KY",
)
CLINIC_WORDS = (
    "Lakeside", "Northside", "Riverbend", "Cedar", "Summit", "Harbor", "Maple", "Westfield", "Pinecrest",
    "Oakwood", "Bayview", "Meadow",
)
CLINIC_KINDS = ("Clinic", "Medical Group", "Health Center", "Family Practice", "Medical Associates")
PAYERS = ("BlueRiver Health", "Evergreen Mutual", "Atlas Insurance", "Keystone Care", "Unity Health Plan")
APP_TABS = ("Overview", "Claims", "Members", "Providers", "Reports", "Billing", "Settings", "Messages", "Help")
BROWSER_TABS = ("Inbox (3)", "Dashboard", "Search results", "Member portal", "Documentation", "Settings")
DOMAINS = ("portal.carelink-health.com", "claims.evergreen-mutual.net", "app.bookwell.io",
           "providers.atlasinsure.com", "myhealth.unityplan.org", "intranet.example.org")
URL_PATHS = ("claims/edit", "appointments/new", "providers/search", "schedule?view=month", "member/claims",
             "booking/select-date", "directory?q=", "docs/view")

TITLE_WORDS = (
    "Quarterly Claims Review", "Patient Intake Summary", "Meeting Notes", "Coverage Policy Update",
    "Provider Onboarding Guide", "Billing Procedures", "Annual Benefits Overview", "Incident Report",
    "Referral Guidelines", "Project Status Update", "Clinic Operations Plan", "Member Newsletter",
)
SECTION_TITLES = (
    "Summary", "Background", "Next Steps", "Key Findings", "Action Items", "Details", "Schedule", "Contacts",
    "Scope", "Requirements", "Timeline", "Notes",
)
SUBJECTS = ("The clinic", "Our team", "The committee", "Each member", "The provider network", "The billing office",
            "Most patients", "The review board", "The new system", "Every department", "The front desk")
VERBS = ("reviewed", "updated", "approved", "discussed", "submitted", "confirmed", "scheduled", "completed",
         "simplified", "expanded", "replaced", "documented")
ADJECTIVES = ("quarterly", "annual", "revised", "pending", "current", "final", "preliminary", "monthly", "shared",
              "regional", "new", "standard")
NOUNS = ("claims report", "coverage policy", "billing schedule", "care plan", "audit summary", "referral process",
         "budget", "intake forms", "staffing plan", "training material", "appointment system", "fee schedule")
TAILS = ("before the deadline", "on Monday", "with the regional office", "for all new members", "in March",
         "after the audit", "without major changes", "ahead of the next review", "as planned", "last week")
IMPERATIVES = ("Review", "Update", "Send", "Confirm", "Archive", "Schedule", "Share", "Check", "Prepare", "Sign")


def person_name(rng: random.Random) -> str:
    """A first and last name."""
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def doctor_name(rng: random.Random) -> str:
    """A doctor's name such as 'Dr. Maria Lopez'."""
    return f"Dr. {person_name(rng)}"


def clinic_name(rng: random.Random) -> str:
    """A clinic's name such as 'Lakeside Medical Group'."""
    return f"{rng.choice(CLINIC_WORDS)} {rng.choice(CLINIC_KINDS)}"


def sentence(rng: random.Random) -> str:
    """A plausible one-line sentence."""
    tail = rng.choice(TAILS)
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {tail}."


def task_phrase(rng: random.Random) -> str:
    """A short to-do phrase such as 'Send the revised budget'."""
    return f"{rng.choice(IMPERATIVES)} the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
