//! Synthetic distractor edits for scale tests (1,000 and 10,000 active edits).
//!
//! Fictional subjects are built from syllables ("Velorania", "Tramsk Institute", "Dorin
//! Kessavel") and crossed with relation templates in both styles (questions, ZsRE-like, and
//! statements, CounterFact-like). Every record has a target, one rephrase and one
//! `Relation_Specificity` probe: the same template with another fictional subject that no record
//! edits under that relation. No two records share (subject, relation), and no probe prompt is an
//! edit prompt. The facts are invented, so the records carry no ground truth of their own; the
//! probes' answers are plausible fillers (locality is scored as agreement with the base model).
//!
//! Deterministic: the same `(n, seed)` always gives the same records (a xorshift generator, no
//! dependency on hashing order).

use std::collections::HashSet;

use super::{EditRecord, Probe};

/// `n` synthetic edit records for `seed`, ids `syn-<seed>-00001`...
pub fn synthetic(n: usize, seed: u64) -> Vec<EditRecord> {
    generate(n, seed).into_iter().map(|(_, r)| r).collect()
}

/// What a subject is; each relation applies to one kind.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Person,
    Country,
    City,
    Company,
    Organisation,
    Work,
    Product,
}

struct Relation {
    kind: Kind,
    /// Two question templates and two statement templates; `{}` is the subject. The first of a
    /// style is the edit prompt, the second its rephrase.
    questions: [&'static str; 2],
    statements: [&'static str; 2],
    answers: &'static [&'static str],
}

const CITIES: &[&str] = &[
    "Lisbon",
    "Oslo",
    "Krakow",
    "Lyon",
    "Turin",
    "Seville",
    "Porto",
    "Munich",
    "Geneva",
    "Bergen",
    "Dublin",
    "Vienna",
    "Prague",
    "Kyoto",
    "Manila",
    "Lima",
    "Nairobi",
    "Toronto",
    "Chicago",
    "Melbourne",
];
const COUNTRIES: &[&str] = &[
    "Portugal", "Norway", "Poland", "Italy", "Spain", "Austria", "Chile", "Peru", "Kenya",
    "Ireland", "Sweden", "Finland", "Greece", "Hungary", "Vietnam", "Morocco", "Mexico", "Canada",
];
const PEOPLE: &[&str] = &[
    "Anna Berg",
    "Marco Valli",
    "Erik Lund",
    "Sofia Marin",
    "Tomas Reyes",
    "Helen Ward",
    "Kenji Mori",
    "Lena Fischer",
    "Omar Haddad",
    "Clara Novak",
    "Ivan Petrov",
    "Rosa Lima",
];
const COMPANIES: &[&str] = &[
    "Siemens", "Google", "Nokia", "Toyota", "Philips", "Samsung", "Nestlé", "IBM", "Sony",
    "Ericsson", "Boeing", "Intel",
];

const RELATIONS: &[Relation] = &[
    Relation {
        kind: Kind::Person,
        questions: ["Where was {} born?", "In which city was {} born?"],
        statements: ["{} was born in the city of", "The birthplace of {} is"],
        answers: CITIES,
    },
    Relation {
        kind: Kind::Person,
        questions: [
            "What is the occupation of {}?",
            "What does {} do for a living?",
        ],
        statements: ["The occupation of {} is", "By profession, {} is a"],
        answers: &[
            "painter",
            "architect",
            "chemist",
            "pianist",
            "lawyer",
            "journalist",
            "surgeon",
            "novelist",
            "engineer",
            "photographer",
            "economist",
            "sculptor",
        ],
    },
    Relation {
        kind: Kind::Person,
        questions: [
            "Which country is {} a citizen of?",
            "What country is {} from?",
        ],
        statements: ["{} is a citizen of", "{} comes from the country of"],
        answers: COUNTRIES,
    },
    Relation {
        kind: Kind::Person,
        questions: ["Which company does {} work for?", "Who is {}'s employer?"],
        statements: ["{} works for", "{} is employed by"],
        answers: COMPANIES,
    },
    Relation {
        kind: Kind::Person,
        questions: [
            "What instrument does {} play?",
            "Which instrument is {} known for?",
        ],
        statements: ["{} plays the", "{} is famous for playing the"],
        answers: &[
            "piano",
            "violin",
            "cello",
            "guitar",
            "trumpet",
            "flute",
            "drums",
            "saxophone",
            "harp",
            "clarinet",
        ],
    },
    Relation {
        kind: Kind::Person,
        questions: ["What sport does {} play?", "Which sport is {} known for?"],
        statements: ["{} is a professional player of", "The sport {} plays is"],
        answers: &[
            "tennis",
            "football",
            "basketball",
            "cricket",
            "golf",
            "hockey",
            "baseball",
            "volleyball",
            "rugby",
            "handball",
        ],
    },
    Relation {
        kind: Kind::Person,
        questions: [
            "What university did {} attend?",
            "Where did {} go to college?",
        ],
        statements: ["{} studied at", "{} graduated from"],
        answers: &[
            "Harvard University",
            "Stanford University",
            "Yale University",
            "Oxford University",
            "Cambridge University",
            "Princeton University",
            "Columbia University",
            "McGill University",
            "Leiden University",
            "Uppsala University",
        ],
    },
    Relation {
        kind: Kind::Country,
        questions: [
            "What is the capital of {}?",
            "Which city is the capital of {}?",
        ],
        statements: ["The capital of {} is", "{}'s capital city is"],
        answers: CITIES,
    },
    Relation {
        kind: Kind::Country,
        questions: [
            "What is the official language of {}?",
            "What language do people speak in {}?",
        ],
        statements: ["The official language of {} is", "In {}, most people speak"],
        answers: &[
            "French",
            "Spanish",
            "German",
            "Portuguese",
            "Italian",
            "Dutch",
            "Swedish",
            "Polish",
            "Greek",
            "Turkish",
            "Arabic",
            "Russian",
        ],
    },
    Relation {
        kind: Kind::Country,
        questions: [
            "What is the currency of {}?",
            "What money do people use in {}?",
        ],
        statements: ["The currency of {} is the", "In {}, people pay with the"],
        answers: &[
            "euro", "dollar", "peso", "franc", "krona", "pound", "rupee", "yen", "dinar", "real",
        ],
    },
    Relation {
        kind: Kind::Country,
        questions: ["Which continent is {} in?", "On which continent is {}?"],
        statements: [
            "{} is located on the continent of",
            "{} is part of the continent of",
        ],
        answers: &[
            "Europe",
            "Asia",
            "Africa",
            "South America",
            "North America",
            "Oceania",
        ],
    },
    Relation {
        kind: Kind::City,
        questions: [
            "Which country is {} in?",
            "In what country is the city of {}?",
        ],
        statements: [
            "{} is a city in the country of",
            "The city of {} is located in",
        ],
        answers: COUNTRIES,
    },
    Relation {
        kind: Kind::City,
        questions: [
            "Which river flows through {}?",
            "What river runs through the city of {}?",
        ],
        statements: [
            "The river that flows through {} is the",
            "{} lies on the banks of the",
        ],
        answers: &[
            "Danube",
            "Rhine",
            "Elbe",
            "Seine",
            "Thames",
            "Tagus",
            "Vistula",
            "Volga",
            "Nile",
            "Mississippi",
        ],
    },
    Relation {
        kind: Kind::Company,
        questions: ["Who founded {}?", "Who is the founder of {}?"],
        statements: ["{} was founded by", "The founder of {} is"],
        answers: PEOPLE,
    },
    Relation {
        kind: Kind::Company,
        questions: ["Where is {} headquartered?", "In which city is {} based?"],
        statements: ["The headquarters of {} is in", "{} is headquartered in"],
        answers: CITIES,
    },
    Relation {
        kind: Kind::Company,
        questions: ["Who is the CEO of {}?", "Who runs {}?"],
        statements: ["The CEO of {} is", "The chief executive of {} is"],
        answers: PEOPLE,
    },
    Relation {
        kind: Kind::Organisation,
        questions: [
            "Where is {} based?",
            "In which city is the headquarters of {}?",
        ],
        statements: ["{} is based in the city of", "The headquarters of {} is in"],
        answers: CITIES,
    },
    Relation {
        kind: Kind::Organisation,
        questions: ["Who established {}?", "Who founded {}?"],
        statements: ["{} was established by", "The founder of {} was"],
        answers: PEOPLE,
    },
    Relation {
        kind: Kind::Work,
        questions: ["Who wrote {}?", "Who is the author of {}?"],
        statements: ["{} was written by", "The author of {} is"],
        answers: PEOPLE,
    },
    Relation {
        kind: Kind::Work,
        questions: ["Who directed {}?", "Who is the director of {}?"],
        statements: ["{} was directed by", "The director of {} is"],
        answers: PEOPLE,
    },
    Relation {
        kind: Kind::Work,
        questions: ["When was {} released?", "In what year did {} come out?"],
        statements: ["{} was released in", "{} came out in the year"],
        answers: &[
            "1954", "1961", "1968", "1973", "1979", "1984", "1990", "1995", "2001", "2008", "2013",
            "2019",
        ],
    },
    Relation {
        kind: Kind::Work,
        questions: [
            "In what language was {} written?",
            "What language is {} in?",
        ],
        statements: [
            "{} was originally written in",
            "The original language of {} is",
        ],
        answers: &[
            "French", "Spanish", "German", "Italian", "Russian", "Japanese", "Swedish", "Polish",
        ],
    },
    Relation {
        kind: Kind::Product,
        questions: ["Which company makes {}?", "Who manufactures {}?"],
        statements: ["{} is made by", "{} is manufactured by"],
        answers: COMPANIES,
    },
    Relation {
        kind: Kind::Product,
        questions: ["When was {} launched?", "In what year did {} come out?"],
        statements: ["{} was launched in", "{} first went on sale in"],
        answers: &[
            "1979", "1985", "1991", "1996", "2001", "2004", "2007", "2010", "2014", "2018",
        ],
    },
];

const ONSETS: &[&str] = &[
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st",
    "tr", "th", "sh", "gl",
];
const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou"];
const CODAS: &[&str] = &["", "", "", "n", "r", "l", "s", "k", "m", "sk", "nd", "v"];
const COUNTRY_SUFFIXES: &[&str] = &["ania", "ovia", "istan", "land", "eria", "onia"];
const CITY_SUFFIXES: &[&str] = &[
    "burg", "ford", "grad", "polis", "ton", "vik", "mouth", "stad",
];
const COMPANY_SUFFIXES: &[&str] = &[
    "Industries",
    "Labs",
    "Systems",
    "Motors",
    "Foods",
    "Media",
    "Robotics",
    "Airlines",
];
const ORG_SUFFIXES: &[&str] = &[
    "Institute",
    "Foundation",
    "Society",
    "Academy",
    "Council",
    "Observatory",
];
const ADJECTIVES: &[&str] = &[
    "Silent", "Golden", "Broken", "Hidden", "Last", "Winter", "Crimson", "Distant", "Quiet",
    "Burning", "Lost", "Northern", "Glass", "Iron", "Pale", "Endless",
];
const NOUNS: &[&str] = &[
    "Harbor", "Garden", "River", "Crown", "Mirror", "Orchard", "Lantern", "Tower", "Voyage",
    "Empire", "Letter", "Forest", "Island", "Bridge", "Compass", "Storm",
];
const MODELS: &[&str] = &["Pro", "One", "X", "Mini", "Max", "Air", "500", "7"];

/// xorshift64*: small, fast and the same on every platform (the compiler's one generator).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        // Spread the seed (splitmix64 step) and never start at zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }
    /// A generator at a given state (never zero).
    pub(crate) fn from_state(state: u64) -> Self {
        Rng(state | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in [-1, 1).
    pub(crate) fn sym(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Fisher-Yates.
    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// A pronounceable made-up word of `syllables` syllables, capitalized.
fn word(rng: &mut Rng, syllables: usize) -> String {
    let mut w = String::new();
    for _ in 0..syllables {
        w.push_str(rng.pick(ONSETS));
        w.push_str(rng.pick(VOWELS));
        w.push_str(rng.pick(CODAS));
    }
    capitalize(&w)
}

fn subject(rng: &mut Rng, kind: Kind) -> String {
    match kind {
        Kind::Person => {
            let first = 2 + rng.below(2);
            let last = 2 + rng.below(2);
            format!("{} {}", word(rng, first), word(rng, last))
        }
        Kind::Country => format!("{}{}", word(rng, 2), rng.pick(COUNTRY_SUFFIXES)),
        Kind::City => {
            let syllables = 1 + rng.below(2);
            format!("{}{}", word(rng, syllables), rng.pick(CITY_SUFFIXES))
        }
        Kind::Company => format!("{} {}", word(rng, 2), rng.pick(COMPANY_SUFFIXES)),
        Kind::Organisation => format!("{} {}", word(rng, 2), rng.pick(ORG_SUFFIXES)),
        Kind::Work => {
            if rng.below(2) == 0 {
                format!("The {} {}", rng.pick(ADJECTIVES), rng.pick(NOUNS))
            } else {
                let noun = rng.pick(NOUNS);
                let syllables = 2 + rng.below(2);
                format!("The {noun} of {}", word(rng, syllables))
            }
        }
        Kind::Product => format!("{} {}", word(rng, 2), rng.pick(MODELS)),
    }
}

/// A subject of `kind` not yet used under relation `rel` (edited or probed).
fn fresh_subject(
    rng: &mut Rng,
    kind: Kind,
    rel: usize,
    used: &mut HashSet<(usize, String)>,
) -> String {
    loop {
        let s = subject(rng, kind);
        if used.insert((rel, s.clone())) {
            return s;
        }
    }
}

fn fill(template: &str, subject: &str) -> String {
    template.replacen("{}", subject, 1)
}

/// The records with the index of their relation in [`RELATIONS`] (for the tests).
fn generate(n: usize, seed: u64) -> Vec<(usize, EditRecord)> {
    let mut rng = Rng::new(seed);
    let mut used = HashSet::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let rel_idx = rng.below(RELATIONS.len());
        let rel = &RELATIONS[rel_idx];
        let question = rng.below(2) == 0;
        let templates = if question {
            &rel.questions
        } else {
            &rel.statements
        };
        let subject = fresh_subject(&mut rng, rel.kind, rel_idx, &mut used);
        let neighbour = fresh_subject(&mut rng, rel.kind, rel_idx, &mut used);
        let target = rng.pick(rel.answers);
        let mut filler = rng.pick(rel.answers);
        if filler == target {
            filler = rel.answers
                [(rel.answers.iter().position(|a| *a == target).unwrap() + 1) % rel.answers.len()];
        }
        out.push((
            rel_idx,
            EditRecord {
                id: format!("syn-{seed}-{:05}", i + 1),
                id_from_index: false,
                prompt: fill(templates[0], &subject),
                subject: Some(subject.clone()),
                subject_aliases: Vec::new(),
                target_new: target.to_string(),
                ground_truth: None,
                rephrase_prompts: vec![fill(templates[1], &subject)],
                locality: vec![Probe {
                    kind: "Relation_Specificity".to_string(),
                    prompt: fill(templates[0], &neighbour),
                    ground_truth: filler.to_string(),
                }],
                portability: Vec::new(),
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{parse_knowedit, to_knowedit};

    #[test]
    fn deterministic_per_seed() {
        let a = synthetic(300, 7);
        assert_eq!(a, synthetic(300, 7));
        assert_ne!(a, synthetic(300, 8));
        // A shorter run is a prefix of a longer one with the same seed.
        assert_eq!(synthetic(50, 7)[..], a[..50]);
        assert!(synthetic(0, 7).is_empty());
    }

    #[test]
    fn thousand_records_are_unique_and_valid() {
        let n = 1000;
        let gen = generate(n, 1);
        assert_eq!(gen.len(), n);
        let mut ids = HashSet::new();
        let mut pairs = HashSet::new();
        let mut edit_prompts = HashSet::new();
        let mut relations = HashSet::new();
        let mut questions = 0;
        for (rel, r) in &gen {
            assert!(ids.insert(r.id.clone()), "duplicate id {}", r.id);
            let subject = r.subject.clone().unwrap();
            assert!(
                pairs.insert((*rel, subject.clone())),
                "{}: (subject, relation) repeated",
                r.id
            );
            assert!(
                r.subject_span().is_some(),
                "{}: subject not in `{}`",
                r.id,
                r.prompt
            );
            assert_eq!(r.rephrase_prompts.len(), 1);
            assert_ne!(r.rephrase_prompts[0], r.prompt);
            assert!(r.rephrase_prompts[0].contains(&subject), "{}", r.id);
            assert_eq!(r.locality.len(), 1);
            assert_eq!(r.locality[0].kind, "Relation_Specificity");
            assert_ne!(r.locality[0].ground_truth, r.target_new);
            edit_prompts.insert(r.prompt.clone());
            edit_prompts.extend(r.rephrase_prompts.iter().cloned());
            relations.insert(*rel);
            questions += r.prompt.ends_with('?') as usize;
        }
        for (_, r) in &gen {
            assert!(
                !edit_prompts.contains(&r.locality[0].prompt),
                "{}: probe is an edit prompt",
                r.id
            );
        }
        // Both styles and (nearly) every relation occur.
        assert!(
            relations.len() >= RELATIONS.len() - 1,
            "{} relations",
            relations.len()
        );
        assert!(
            (350..=650).contains(&questions),
            "{questions} questions of {n}"
        );

        // The records survive the KnowEdit JSON round trip that `amend data synth` writes.
        let records: Vec<EditRecord> = gen.into_iter().map(|(_, r)| r).collect();
        let json = serde_json::to_string(&to_knowedit(&records)).unwrap();
        assert_eq!(parse_knowedit(&json).unwrap(), records);
    }

    #[test]
    fn ten_thousand_records_stay_unique() {
        let gen = generate(10_000, 3);
        let pairs: HashSet<_> = gen
            .iter()
            .map(|(rel, r)| (*rel, r.subject.clone().unwrap()))
            .collect();
        assert_eq!(pairs.len(), 10_000);
        let subjects: HashSet<_> = gen
            .iter()
            .map(|(_, r)| r.subject.clone().unwrap())
            .collect();
        // Mostly distinct subjects: the set is a crowd of different entities, not a few
        // entities with many facts.
        assert!(
            subjects.len() > 9_000,
            "{} distinct subjects",
            subjects.len()
        );
    }
}
