"""VQA accuracy (VQAv2, OK-VQA, TextVQA, VizWiz) under each evaluation harness's rule, by name.

Every harness scores a prediction the same way once the answers are processed: for each of the
ten annotators, min(1, #other annotators who gave the prediction / 3), averaged over the ten
(leave one annotator out; the official script compares answer records, distinct by answer_id,
so exactly one is left out). They differ in how they process the answers first:

  vlmevalkit  (the paper's harness, the default) open-compass/VLMEvalKit,
              vlmeval/dataset/utils/vqa_eval.py: `process_line(method='vqa_score')` with
              `process_answer` (strip, vlmeval/smp/misc.py `process_punctuation`, then
              `_process_digit_article`) on the prediction and every reference, always. Its period
              rule `(?<!\\d)\\.(?!\\d)` keeps a period after a digit: "2." stays "2.".
  lmms-eval   EvolvingLMMs-Lab/lmms-eval, lmms_eval/tasks/vqav2/utils.py
              `vqav2_process_results`: strip, then `EvalAIAnswerProcessor.process_punctuation` and
              `.process_digit_article` (lmms_eval/tasks/_task_utils/vqa_eval_metric.py), always.
              Its digit-comma test is `(?<=\\d)(\\,)+(?=\\d)` (several commas count).
  lmms-eval-textvqa  the same repository's textvqa, ok_vqa and vizwiz_vqa utils.py
              (`*_process_results`): the processor's `__call__`, which first lower-cases, deletes
              every "," and "?" and splits "'s" off ("dog's" -> "dog 's"), then the two steps above.
  official    GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py `VQAEval.evaluate`:
              strip; `processPunctuation` and `processDigitArticle` ONLY when the references are
              not all the same string. With ten "yes" a prediction "Yes", "yes." or "the yes"
              scores 0: the comparison is then of the stripped strings, case and all.

Quirks kept because the harnesses have them: official and lmms-eval delete a period not followed by
a digit (their pattern `(?!<=\\d)(\\.)(?!\\d)` is a look-ahead for "<=", so it tests nothing before
the period), VLMEvalKit one neither after nor before a digit; each passes re.UNICODE (32) as `sub`'s
count, so at most 32 periods go; a mark is deleted (not spaced) when the text has the mark next to a
space or a digit-comma-digit anywhere; number words up to "ten" and "none" -> digits; "a", "an",
"the" dropped; the 120 contractions restored (capitalised keys such as "Im" never match after
lower-casing). All four share the punctuation list, number words, articles and contractions (the
same 120 pairs in each file).

One departure: with a single reference the harnesses' leave-one-out leaves no one, and every
prediction scores 0; here it scores 1 on a match (after the rule's processing) and 0 otherwise.

    python -c "import vqa_rules as v; print(v.vqa_accuracy('Yes', ['yes'] * 10, 'official'))"  # 0.0
"""
import re

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!"]
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = dict(pair.split(":") for pair in """
    aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
    couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
    hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
    howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
    itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
    mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
    neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
    'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
    shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
    somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll
    somebodys:somebody's
    someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
    someones:someone's somethingd:something'd somethingd've:something'd've
    something'dve:something'd've somethingll:something'll thats:that's thered:there'd
    thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
    theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
    wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll
    whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's
    whereve:where've whod:who'd
    whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're
    whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've
    wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
    y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've
    youll:you'll youre:you're youve:you've""".split())

DIGIT_COMMA = re.compile(r"\d,\d")            # official and VLMEvalKit
DIGIT_COMMAS = re.compile(r"(?<=\d),+(?=\d)")  # lmms-eval
PERIOD = re.compile(r"\.(?!\d)")               # official and lmms-eval: a period not before a digit
VLMEVALKIT_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # ... and not after one either
PERIODS_DELETED = re.UNICODE  # the harnesses' count argument to sub: at most 32 periods go


def strip(text):
    """Every harness's first step: newlines and tabs to spaces, then the ends stripped."""
    return str(text).replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text, digit_comma=DIGIT_COMMA, period=PERIOD):
    """Each mark of PUNCTUATION deleted when the text holds it next to a space or has a
    digit-comma-digit anywhere, else replaced by a space; then up to 32 periods deleted.
    "black/white" -> "black white";  "yes, it-is" -> "yes it is";  "1,000" -> "1000"."""
    out = text
    delete = digit_comma.search(text) is not None
    for mark in PUNCTUATION:
        gone = delete or mark + " " in text or " " + mark in text  # tested on the input text
        out = out.replace(mark, "" if gone else " ")
    return period.sub("", out, PERIODS_DELETED)


def process_digit_article(text):
    """Lower case, number words to digits, articles dropped, contractions restored:
    "The Two dogs" -> "2 dogs";  "dont know" -> "don't know"."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def eval_ai_call(text):
    """lmms-eval's EvalAIAnswerProcessor.__call__ (its TextVQA, OK-VQA, VizWiz): lower case, "," and
    "?" deleted, "'s" split off, then punctuation and digits-articles:
    "Black,White" -> "blackwhite"."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return process_digit_article(process_punctuation(text, DIGIT_COMMAS))


# name: (processing of one answer, applied always (True) or only when the references disagree)
VQA_RULES = {
    "vlmevalkit": (lambda t: process_digit_article(process_punctuation(t, DIGIT_COMMA,
                                                                       VLMEVALKIT_PERIOD)), True),
    "lmms-eval": (lambda t: process_digit_article(process_punctuation(t, DIGIT_COMMAS)), True),
    "lmms-eval-textvqa": (eval_ai_call, True),
    "official": (lambda t: process_digit_article(process_punctuation(t)), False),
}


def vqa_normalize(answer, rule="vlmevalkit"):
    """One answer as `rule` processes it (the official rule processes only where the references
    disagree: vqa_accuracy decides). "Two dogs." -> "2 dogs";  "2." -> "2." (vlmevalkit) or "2"
    (official, lmms-eval)."""
    return VQA_RULES[check_rule(rule)][0](strip(answer))


def check_rule(rule):
    """The rule's name when VQA_RULES has it, else ValueError naming the rules there are."""
    if rule not in VQA_RULES:
        raise ValueError(f"unknown VQA rule {rule!r}; choose one of {', '.join(VQA_RULES)}")
    return rule


def vqa_accuracy(prediction, answers, rule="vlmevalkit"):
    """VQA accuracy under `rule` (VQA_RULES): min(#other annotators who gave the prediction / 3, 1),
    averaged over leaving each annotator out in turn.

    Worked example: prediction "Two." and answers 2 x "2", 8 x "3" (the prediction reads "2"):
      leave out a "2" (2 subsets): one "2" among the other nine -> min(1/3, 1) = 1/3
      leave out a "3" (8 subsets): two "2"s among the other nine -> min(2/3, 1) = 2/3
      accuracy = (2 * 1/3 + 8 * 2/3) / 10 = 0.6   (not min(2/3, 1) = 0.667: the average differs)
    Where the rules part: "Yes" against ten "yes" -> 1 (vlmevalkit, lmms-eval), 0 (official: the
    references agree, so nothing is processed); "2." against 4 x "2", 6 x "3" -> 1 (official,
    lmms-eval: the period goes), 0 (vlmevalkit: a period after a digit stays).
    """
    process, always = VQA_RULES[check_rule(rule)]
    predicted = strip(prediction)
    given = [strip(a) for a in answers]
    if always or len(set(given)) > 1:
        predicted = process(predicted)
        given = [process(a) for a in given]
    if len(given) == 1:  # no one to leave out (the harnesses would score 0): a match
        return float(given[0] == predicted)
    matches = sum(a == predicted for a in given)
    # leaving out annotator i removes one match exactly when annotator i gave the prediction
    return sum(min((matches - (a == predicted)) / 3, 1.0) for a in given) / len(given)
