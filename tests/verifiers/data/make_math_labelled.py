r"""Writes math_labelled.jsonl: (gold, response, expected, category) cases for posttrain.verifiers.math.

Every case is a hand-written (gold, answer, expected) triple; the generator only wraps the answer in one of a
few realistic response templates (\boxed{}, <answer> tags, "The answer is", GSM8K ####), which never change
the answer. Labels are mathematical equality (percent signs, units, degrees and \text{} are notation; the
bracket types of intervals and the order of tuples matter; x100 percentage retries, pi ~ 3.14 and tiny
differences are never equal). Run: python tests/verifiers/data/make_math_labelled.py
"""

import json
from pathlib import Path

T, F = True, False
PM = r"\begin{pmatrix}"
EPM = r"\end{pmatrix}"
BM = r"\begin{bmatrix}"
EBM = r"\end{bmatrix}"

# fmt: off
CASES = {
    "numbers": [
        (r"\frac{1}{2}", "0.5", T), ("0.5", r"\frac{1}{2}", T), ("3/4", "0.75", T), ("0.125", r"\frac{1}{8}", T),
        ("1000", "1,000", T), ("1000000", "1{,}000{,}000", T), ("2500", r"2.5\times 10^{3}", T),
        ("0.003", r"3 \times 10^{-3}", T), ("-7", "-7", T), (r"-\frac{3}{5}", "-0.6", T), ("12", "12.0", T),
        ("12", "12.00", T), ("7", r"\frac{14}{2}", T), (r"\frac{22}{7}", "22/7", T), ("1.5", r"\frac{3}{2}", T),
        ("-2.25", r"-\frac{9}{4}", T), ("100", "10^2", T), ("0.2", r"\frac{1}{5}", T),
        (r"\frac{9}{12}", r"\frac{3}{4}", T),
        ("4", "+4", T), ("36", "6^2", T),
        (r"\frac{1}{2}", "0.51", F), ("0.5", r"\frac{1}{3}", F), ("1000", "100", F), ("3/4", "4/3", F),
        ("2500", r"2.5\times10^{2}", F), ("-7", "7", F), ("12", "1.2", F), ("0.125", "0.12", F),
        (r"\frac{2}{3}", "0.667", F), (r"\frac{2}{3}", "0.6667", F), ("22/7", "3.142857", F), ("1000", "1,001", F),
        ("5", "6", F), (r"-\frac{3}{5}", r"\frac{3}{5}", F), ("100", "10^3", F), ("0.2", "2", F), ("45", "54", F),
        ("36", "6", F),
    ],
    "latex_wrappers": [
        (r"\frac{3}{4}", r"\tfrac{3}{4}", T), (r"\frac{5}{6}", r"\dfrac{5}{6}", T),
        (r"\left(\frac{1}{2}\right)", r"\frac{1}{2}", T), ("6", r"\left( 6 \right)", T), (r"\sqrt{2}", r"\sqrt 2", T),
        (r"\frac{\sqrt{3}}{3}", r"\dfrac{\sqrt{3}}{3}", T), (r"2\sqrt{5}", r"2 \sqrt{5}", T), ("3", "$3$", T),
        (r"\frac{1}{4}", r"\displaystyle \frac{1}{4}", T), (r"\frac{7}{2}", r"\frac72", T),
        (r"\dfrac{5}{2}", "2.5", T), (r"\sqrt{12}", r"2\sqrt{3}", T),
        (r"\frac{3}{4}", r"\tfrac{4}{3}", F), (r"\sqrt{2}", r"\sqrt{3}", F), (r"2\sqrt{5}", r"5\sqrt{2}", F),
        (r"\frac{\sqrt{3}}{3}", r"\frac{\sqrt{3}}{2}", F), (r"\frac{7}{2}", r"\frac{2}{7}", F),
        (r"\frac12", r"\frac{1}{3}", F), (r"\dfrac{5}{2}", "5.2", F), (r"\sqrt{12}", r"3\sqrt{2}", F),
    ],
    "percentages": [
        (r"50\%", "50", T), (r"50\%", r"50\%", T), ("25", r"25\%", T), (r"12.5\%", "12.5", T), (r"40\%", r"40 \%", T),
        ("75%", r"75\%", T), (r"8\%", r"8.0\%", T), ("60", "60 percent", T),
        ("50", "0.5", F), ("0.5", "50", F), ("0.25", "25", F), ("12", "0.12", F), (r"30\%", "3", F),
        (r"30\%", r"0.3\%", F), (r"45\%", r"54\%", F), ("8", "800", F), ("0.08", "8", F), (r"20\%", r"2\%", F),
    ],
    "symbolic": [
        ("2x+1", "1+2x", T), ("x^2-1", "(x-1)(x+1)", T), (r"\frac{x}{2}", "0.5x", T), (r"3\sqrt{2}", r"\sqrt{18}", T),
        (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}", T), (r"2\pi r", r"2r\pi", T), ("x^3", r"x\cdot x^2", T),
        (r"\frac{2}{x}", "2x^{-1}", T), ("n(n+1)/2", r"\frac{n^2+n}{2}", T), ("(a+b)^2", "a^2+2ab+b^2", T),
        ("x^2+2x+1", "(x+1)^2", T), (r"\frac{x^2-4}{x-2}", "x+2", T), ("3(x-2)", "3x-6", T), ("4y^2", "(2y)^2", T),
        ("2x+1", "2x-1", F), ("x^2-1", "(x-1)^2", F), (r"\frac{x}{2}", "2x", F), (r"3\sqrt{2}", r"\sqrt{6}", F),
        (r"2\pi r", r"\pi r^2", F), ("x^3", "3x", F), ("n(n+1)/2", "n(n-1)/2", F), ("x+y", "x-y", F),
        (r"\frac{1}{x}", "x", F), ("x^2+2x+1", "(x-1)^2", F), ("3(x-2)", "3x-2", F), ("4y^2", "2y^2", F),
        ("a^2", "b^2", F),
    ],
    "pi_and_roots": [
        (r"\pi", r"\pi", T), (r"2\pi", r"\pi\cdot 2", T), (r"\frac{\pi}{3}", r"\pi/3", T),
        (r"\pi/4", r"\frac{\pi}{4}", T),
        (r"4\pi", r"\pi \cdot 4", T), (r"\sqrt{3}/2", r"\frac{\sqrt{3}}{2}", T),
        (r"\pi", "3.14", F), (r"\pi", "3.14159", F), (r"\pi", r"\frac{22}{7}", F), (r"2\pi", "6.283", F),
        (r"\frac{\pi}{3}", "1.047", F), (r"100\pi", "314", F), (r"\sqrt{2}", "1.414", F), (r"\sqrt{3}/2", "0.866", F),
        (r"\pi/4", r"\pi/2", F), (r"\sqrt{2}", "1.41421356", F),
    ],
    "tiny_differences": [
        (r"\frac{1}{2004!}", r"\frac{1}{2004!}", T), ("10^{-12}", r"1\times10^{-12}", T), ("2^{100}", "2^{100}", T),
        ("0.000001", "10^{-6}", T), ("1/3", r"\frac{1}{3}", T), ("1/2004!", r"\frac{1}{2004!}", T),
        (r"\frac{1}{2004!}", r"\frac{1}{2006!}", F), ("1/3", "0.33333333", F), ("0.1", "0.1000001", F),
        (r"\frac{1}{1000000}", r"\frac{1}{1000001}", F), ("10^{-12}", "0", F), ("2^{100}", "2^{100}+1", F),
        ("1", "0.9999999", F), ("123456789", "123456788", F), (r"\frac{1}{3}", r"\frac{1}{3}+10^{-10}", F),
        ("10^{-9}", "10^{-10}", F), ("1/2004!", "0", F),
        ("5!", "120", T), (r"\frac{10!}{8!}", "90", T), ("5!", "24", F), ("6!", "5!", F), ("3!!", "6", F),
    ],
    "sets": [
        (r"\{1,2,3\}", r"\{3,1,2\}", T), (r"\{1, 2\}", r"\{2, 1\}", T), ("1, 2", "2, 1", T), ("-2, 3", "3, -2", T),
        ("1, -1", "x = 1, x = -1", T), (r"\{\frac{1}{2}, 2\}", r"\{2, 0.5\}", T), ("2, 5", r"\{5, 2\}", T),
        (r"\sqrt{2}, -\sqrt{2}", r"-\sqrt{2}, \sqrt{2}", T), ("0, 1, 2", "2, 1, 0", T),
        (r"\{-1, 4\}", r"\left\{ 4, -1 \right\}", T), (r"\{a, b\}", r"\{b, a\}", T),
        (r"\{1,2,3\}", r"\{1,2\}", F), (r"\{1,2\}", r"\{1,2,3\}", F), ("1, 2", "1, 3", F), ("-2, 3", "2, -3", F),
        (r"\{1, 2\}", "3", F), ("2, 5", "25", F), (r"\sqrt{2}, -\sqrt{2}", r"\sqrt{2}", F), ("0, 1, 2", "0, 1, 1", F),
        (r"\{-1, 4\}", r"\{1, -4\}", F), ("3, 4", "3", F), ("1, -1", "x = 1", F),
        (r"1 \pm \sqrt{19}", r"1+\sqrt{19}, 1-\sqrt{19}", T), (r"\pm 3", "3, -3", T), ("-3, 3", r"\pm 3", T),
        (r"2 \pm \sqrt{3}", r"2 \pm \sqrt{3}", T), (r"\frac{1 \pm \sqrt{5}}{2}", r"\frac{1 \pm \sqrt{5}}{2}", T),
        (r"1 \pm \sqrt{19}", r"1+\sqrt{19}", F), (r"\pm 3", "3", F), ("3", r"\pm 3", F),
        (r"2 \pm \sqrt{3}", r"2 \pm \sqrt{2}", F), (r"1 \pm \sqrt{2}", r"-1 \pm \sqrt{2}", F),
    ],
    "intervals": [
        ("[1, 3)", "[1,3)", T), (r"(-\infty, 2]", r"\left(-\infty, 2\right]", T), (r"(0, \infty)", r"(0,\infty)", T),
        (r"(\frac{1}{2}, 3]", "(0.5, 3]", T), (r"(-\infty, -1) \cup (1, \infty)", r"(1, \infty) \cup (-\infty, -1)", T),
        ("[2, 5]", "[2.0, 5]", T), (r"(-3, \sqrt{2})", r"(-3,\sqrt 2)", T), (r"[0, \pi]", r"[0, \pi]", T),
        (r"(-\infty, 0)\cup(0,\infty)", r"(-\infty,0) \cup (0, \infty)", T), ("[-1, 1]", r"\left[ -1, 1 \right]", T),
        ("[1, 3)", "[1, 3]", F), ("[1,3)", "(1,3)", F), (r"(-\infty, 2]", r"(-\infty, 2)", F),
        (r"(0, \infty)", r"[0, \infty)", F), (r"(\frac{1}{2}, 3]", r"(\frac{1}{2}, 3)", F), ("[2, 5]", "[5, 2]", F),
        ("[2, 5]", "[2, 6]", F), (r"(-\infty, -1) \cup (1, \infty)", r"(-\infty, -1] \cup [1, \infty)", F),
        (r"(-\infty, -1) \cup (1, \infty)", "(-1, 1)", F), (r"[0, \pi]", r"[0, 2\pi]", F), ("(-3, 2)", "(-2, 3)", F),
        ("[-1, 1]", "-1, 1", F),
    ],
    "tuples": [
        ("(1, 2)", "(1,2)", T), ("(3, -4)", r"\left(3, -4\right)", T), (r"(\frac{1}{2}, 2)", "(0.5, 2)", T),
        ("(1, 2, 3)", "(1,2,3)", T), (r"(2\sqrt{2}, \pi)", r"(\sqrt{8}, \pi)", T), ("(0, 0)", "(0,0)", T),
        ("(-1, 5)", "(-1, 5.0)", T), ("(a, b)", "(a,b)", T), ("(2, -3, 1)", r"\left(2,-3,1\right)", T),
        ("(1, 2)", "(2, 1)", F), ("(3, -4)", "(-4, 3)", F), ("(1, 2, 3)", "(1, 2)", F), ("(1, 2)", "[1, 2]", F),
        ("(0, 0)", "(0, 1)", F), (r"(2\sqrt{2}, \pi)", r"(2\sqrt{2}, 3.14)", F), ("(1, 2)", "3", F),
        ("(-1, 5)", "(1, -5)", F), ("(2, -3, 1)", "(2, -3, -1)", F),
    ],
    "matrices": [
        (PM + r" 1 & 2 \\ 3 & 4 " + EPM, BM + r"1&2\\3&4" + EBM, T),
        (PM + r" \frac{1}{2} \\ 3 " + EPM, PM + r" 0.5 \\ 3 " + EPM, T),
        (PM + r" 2 & 0 \\ 0 & 2 " + EPM, PM + r"2&0\\0&2" + EPM, T),
        (PM + r" 1 \\ -1 \\ 2 " + EPM, PM + r"1\\-1\\2" + EPM, T),
        (PM + r" \sqrt{2} & 1 " + EPM, PM + r" \sqrt 2 & 1.0 " + EPM, T),
        (PM + r" -\frac{3}{5} \\ \frac{4}{5} " + EPM, BM + r" -0.6 \\ 0.8 " + EBM, T),
        (PM + r" 1 & 2 \\ 3 & 4 " + EPM, PM + r" 1 & 3 \\ 2 & 4 " + EPM, F),
        (PM + r" 1 & 2 \\ 3 & 4 " + EPM, PM + r" 1 & 2 \\ 3 & 5 " + EPM, F),
        (PM + r" 1 \\ -1 \\ 2 " + EPM, PM + r" 1 \\ 1 \\ 2 " + EPM, F),
        (PM + r" 1 & 2 \\ 3 & 4 " + EPM, "1, 2, 3, 4", F),
        (PM + r" 1 \\ 2 " + EPM, PM + r" 1 & 2 " + EPM, F),
        (PM + r" 2 & 0 \\ 0 & 2 " + EPM, "2", F),
        (PM + r" 1 & 2 \\ 3 & 4 " + EPM, r"\begin{vmatrix} 1 & 2 \\ 3 & 4 \end{vmatrix}", F),
        (PM + r" -\frac{3}{5} \\ \frac{4}{5} " + EPM, PM + r" \frac{3}{5} \\ -\frac{4}{5} " + EPM, F),
    ],
    "equations": [
        ("3", "x = 3", T), ("x = 3", "3", T), ("x=3", "x = 3", T), ("y = 2x + 1", "y=1+2x", T),
        ("y = 2x+1", "2x+1 = y", T), ("-5", "x=-5", T), (r"x = \frac{1}{2}", "x = 0.5", T),
        ("3x - y + 13 = 0", "y = 3x+13", T), ("x + y = 5", "2x + 2y = 10", T), ("x^2 + y^2 = 25", "25 = x^2 + y^2", T),
        ("2x - 4 = 0", "x - 2 = 0", T), ("y = x^2", r"y=x\cdot x", T), ("7", "n = 7", T),
        ("3x - y + 13 = 0", "3x + 4y + 14 = 0", F), ("y = 2x+1", "y = 2x-1", F), ("x = 3", "y = 3", F),
        ("x + y = 5", "x - y = 5", F), ("x^2+y^2=25", "x^2+y^2=5", F), ("3", "x = -3", F), ("x=3", "x=4", F),
        ("2x - 4 = 0", "2x-4=1", F), ("y = 2x + 1", "2x+1 = 0", F), ("x+y=5", "5", F), ("y=3x+13", "13", F),
        ("3x-y+13=0", "3x-y+13", F), ("x = y", "y = x", T), ("x = y", "x = -y", F),
    ],
    "units_text": [
        ("10", r"10 \text{ cm}", T), ("10", r"10\text{cm}", T), ("5", r"\text{5 meters}", T),
        ("25", r"25 \mbox{ dollars}", T), ("18", r"\$18", T), ("18", r"18 \text{ dollars}", T),
        ("12", r"12\,\text{m}", T),
        ("100", r"100 \text{ cm}^2", T), ("9.8", r"9.8\ \text{m/s}^2", T), ("3", r"3\text{ hours}", T),
        (r"\text{(C)}", r"\text{(C)}", T), (r"\text{Monday}", r"\text{Monday}", T), ("64", r"64 \text{ m}^3", T),
        ("100", r"10\text{ cm}^2", F), ("10", r"100 \text{ cm}", F), ("12", r"1.2\text{ m}", F), ("18", r"\$81", F),
        (r"\text{(C)}", r"\text{(D)}", F), (r"\text{Monday}", r"\text{Tuesday}", F),
        ("3", r"3 \text{ hours } 20 \text{ minutes}", F), ("25", r"2.5 \text{ dollars}", F),
        ("64", r"4 \text{ m}^3", F),
        ("5", r"5 \text{ or } 6", F),
    ],
    "degrees": [
        ("30", r"30^\circ", T), (r"30^\circ", "30", T), ("45", r"45^{\circ}", T), (r"60^\circ", "60°", T),
        ("90", r"90 \text{ degrees}", T), (r"120^\circ", r"120^{\circ}", T), ("22.5", r"22.5^\circ", T),
        ("30", r"60^\circ", F), (r"45^\circ", r"135^\circ", F), ("90", r"9^\circ", F), (r"30^\circ", "300", F),
        (r"120^\circ", r"12^{\circ}", F), ("22.5", r"225^\circ", F),
    ],
    "base_n": [
        ("1011_2", "1011_2", T), ("1011_2", "1011_{2}", T), ("123_4", "123_{4}", T), ("A3_{16}", "A3_{16}", T),
        ("1011_2", "11", F), ("1011_2", "1011_3", F), ("123_4", "27", F), ("1011_2", "1101_2", F), ("31_8", "25", F),
        ("A3_{16}", "163", F),
    ],
}
# fmt: on

# Extraction: full responses (not wrapped by a template).
EXTRACTION = [
    ("42", "First attempt gives \\boxed{41}. Wait, I dropped a carry; redoing it gives \\boxed{42}.", T),
    ("7", "<think>\n3 + 4 = 7\n</think>\n<answer>7</answer>", T),
    ("7", "She has 3 red and 4 blue marbles, so 3 + 4 = 7.\n#### 7", T),
    ("7", "Adding them up, the answer is 7.", T),
    ("7", "The final answer is: 7", T),
    ("x^{2}", "Differentiating x^3/3 gives \\boxed{x^{2}}.", T),
    ("\\frac{1}{2}", "The probability is $\\boxed{\\dfrac{1}{2}}$.", T),
    ("72", "Half of 48 is 24, and 48 + 24 = 72.\n#### 72\n", T),
    ("15", "<answer>\n15\n</answer>", T),
    ("9", "I first thought 8, but the answer is 9.", T),
    ("42", "I computed 42 but I am not sure.", F),
    ("42", "So \\boxed{42}... actually no, it is \\boxed{43}.", F),
    ("42", "The answer is \\boxed{}", F),
    ("42", "The answer is 41. Checking: 42 would be wrong.", F),
    ("42", "<answer>42", F),
    ("42", "#### \n42", F),
    ("42", "Is the answer 42? No: \\boxed{24}", F),
    ("5", "It could be \\boxed{5, 6}", F),
    ("3", "\\boxed{3}\\boxed{4}", F),
    ("2", "\\boxed{2 \\pm 1}", F),
    ("12", "12", F),
    ("12", "The question asks for 12 apples worth of work; I get \\boxed{13}.", F),
]

PROSE = [
    "Let me set up the problem carefully. There are 3 cases to consider, and case 2 is the only valid one.",
    "We simplify step by step, checking each of the 4 terms separately.",
    "Substituting back into the original equation confirms the result.",
    "Using the formula from step 1 and collecting like terms:",
]


def wrap(answer: str, i: int) -> str:
    prose = PROSE[i % len(PROSE)]
    style = i % 5
    if style == 0:
        return f"{prose}\nTherefore, the final answer is $\\boxed{{{answer}}}$."
    if style == 1:
        return f"<think>\n{prose}\n</think>\n<answer>{answer}</answer>"
    if style == 2:
        return f"{prose} Hence the answer is ${answer}$."
    if style == 3:
        return f"{prose}\n#### {answer}"
    return f"\\boxed{{{answer}}}"


def build() -> list[dict]:
    rows, i = [], 0
    for category, triples in CASES.items():
        for gold, answer, expected in triples:
            rows.append({"gold": gold, "response": wrap(answer, i), "expected": expected, "category": category})
            i += 1
    for gold, response, expected in EXTRACTION:
        rows.append({"gold": gold, "response": response, "expected": expected, "category": "extraction"})
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("math_labelled.jsonl")
    rows = build()
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"{len(rows)} cases, {sum(not r['expected'] for r in rows)} must-be-False -> {out}")
