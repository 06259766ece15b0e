# Train and evaluate the default CLaRa checkpoint (SmolLM2-135M-Instruct, CR16) from ../shared/data.
#
# The paper's stages with pooled memories and a reading margin (docs/training-run.md,
# "Fifth CPU session"): SCP, then end-to-end for the query reasoner and a retrieval stage
# ("Eleventh CPU session"), then the SCP generator instruction-tuned with distillation from the
# fine-tuned text reader ("Tenth CPU session") and a margin against restating the question
# ("Twenty-third CPU session"), then the model card's numbers: F1 of CLaRa vs the same checkpoint given
# another question's documents vs no retrieval vs text reading (the Oracle rows of HotpotQA dev
# 0-199 and NQ dev 0-299, both held out), the reading check, and Recall@5 of the compressor and of the trained
# query reasoner vs all-MiniLM-L6-v2 on 20-candidate pools. The defaults are the CPU
# recipe of the checkpoint shipped in clara_plugins/checkpoints (docs/model-card.md; its two
# SCP runs ran on a GPU, the rest on 2 CPU cores; two fixes since, the reading margin's row
# pairing and the straight-through top-k's mask, mean a rerun trains a little otherwise); sizes come from the
# environment, so that a GPU run and the smoke test (tests/test_train_default.py) are the
# same script:
#
#   bash benchmarks/train_default.sh              # the shipped recipe on the CPU, SCP steps in micro-batches
#   DEVICE=cuda SCP_ACCUM=1 SCP_MORE_ACCUM=1 RETRIEVAL_ACCUM=1 bash benchmarks/train_default.sh  # the shipped recipe on a GPU
#   DEVICE=cuda SCP_STEPS=2500 SCP_BATCH=32 SCP_ACCUM=1 SCP_MORE_STEPS=0 RETRIEVAL_ACCUM=1 INSTRUCT_STEPS=1000 TEXT_STEPS=1000 \
#       DISTILL_STEPS=1000 E2E_STEPS=300 BATCH=16 FREEZE_COMPRESSOR= FREEZE_GENERATOR= EVAL_LIMIT=200 \
#       RECALL_LIMIT=200 bash benchmarks/train_default.sh                    # a larger run
#   DEVICE=cuda SCP_INIT=clara_plugins/checkpoints/smollm2-135m-instruct-cr16 CR=8 SCP_ACCUM=1 SCP_MORE_STEPS=0 \
#       RETRIEVAL_ACCUM=1 bash benchmarks/train_default.sh   # SCP continued from the shipped compressor, at CR8
#
# PARTS runs a part of it, so that SCP can run on a GPU machine that has no data files and
# the later stages here (docs/model-card.md, "Training it further on a GPU"):
#
#   PARTS=rows bash benchmarks/train_default.sh                      # here: the rows, in $OUT/rows
#   PARTS=scp DEVICE=cuda SCP_INIT=... CR=8 SCP_ACCUM=1 SCP_MORE_STEPS=0 \
#       bash benchmarks/train_default.sh                             # there, on the rows: $OUT/scp-fp16
#   PARTS="later eval" SCP_CHECKPOINT=runs/default/scp-fp16 CR=8 bash benchmarks/train_default.sh  # here again
#
# Results: $OUT/eval/*.json; the shippable fp16 adapters: $OUT/cr$CR-fp16.
set -euo pipefail

DATA=${DATA:-${CLARA_DATA:-../shared/data}}
OUT=${OUT:-runs/default}
DEVICE=${DEVICE:-auto}
BASE_MODEL=${BASE_MODEL:-smollm2-135m-instruct}
CR=${CR:-16}                      # the compression rate: memory vectors a document = 256 / CR
SCP_INIT=${SCP_INIT:-}            # a pooled checkpoint SCP continues from, read at CR (empty: a fresh compressor)
SCP_STEPS=${SCP_STEPS:-250}
SCP_BATCH=${SCP_BATCH:-16}        # SCP rows a step
# micro-batches an SCP step, 4 rows a pass as earlier CPU runs: the reading margin then pairs each
# row with another of its micro-batch, not of the whole step, and each micro-batch's tokens are
# averaged on their own (the shipped checkpoint: 1, on a GPU; docs/training-run.md, 45th session)
SCP_ACCUM=${SCP_ACCUM:-4}
SCP_SCHEDULE=${SCP_SCHEDULE:-constant}
SCP_MORE_STEPS=${SCP_MORE_STEPS:-175}  # a second SCP run from the first, other data order (0: none)
SCP_MORE_BATCH=${SCP_MORE_BATCH:-32}   # its rows a step
SCP_MORE_ACCUM=${SCP_MORE_ACCUM:-8}    # its micro-batches a step (the shipped checkpoint: 1, on a GPU)
INSTRUCT_STEPS=${INSTRUCT_STEPS:-0}   # instruction tuning before end-to-end (0: none; the distilled stage tunes the SCP generator)
TEXT_STEPS=${TEXT_STEPS:-40}      # the text reader: the baseline, and the distillation teacher
DISTILL_STEPS=${DISTILL_STEPS:-120}  # instruction tuning with distillation from it (0: none)
DISTILL_MARGIN=${DISTILL_MARGIN:-1.5}  # the reading margin's target there, in nats per token
DISTILL_RESTATE=${DISTILL_RESTATE:-1.0}  # weight of the margin against restating the question there (0: none)
DISTILL_MORE_STEPS=${DISTILL_MORE_STEPS:-0}  # a second distilled run from the first, other data order (0: none)
RESTATE_STEPS=${RESTATE_STEPS:-0}  # a third, with the restatement margin at weight 1 (0: none)
E2E_STEPS=${E2E_STEPS:-20}
BATCH=${BATCH:-4}
E2E_BATCH=${E2E_BATCH:-4}
RETRIEVAL_STEPS=${RETRIEVAL_STEPS:-200}  # the query reasoner alone, in-batch negatives (0: none)
RETRIEVAL_BATCH=${RETRIEVAL_BATCH:-32}  # rows a step, each ranked against all the step's candidates
RETRIEVAL_ACCUM=${RETRIEVAL_ACCUM:-4}   # micro-batches a step: the same loss, 0.39x the peak RSS of one 32-row batch
E2E_ROWS=${E2E_ROWS:-100,40,20}   # HotpotQA, 2Wiki, MuSiQue rows: compressing 20 candidates each is most of the stage's cost on CPU
RETRIEVAL_WEIGHT=${RETRIEVAL_WEIGHT:-1.0}  # the e2e stage's gold retrieval term (0: the paper's loss)
FREEZE_GENERATOR=${FREEZE_GENERATOR---freeze-generator}  # e2e stage: the query reasoner alone learns; empty: the generator too (paper)
SCP_LR=${SCP_LR:-3e-4}
SCP_MORE_LR=${SCP_MORE_LR:-3e-4}
LR=${LR:-2e-4}
E2E_LR=${E2E_LR:-1e-4}
MARGIN=${MARGIN:-1.0}             # weight of the reading margin (0: the paper's loss)
FREEZE_COMPRESSOR=${FREEZE_COMPRESSOR---freeze-compressor}  # instruct stage; empty: train it (paper)
PROBE_EVERY=${PROBE_EVERY:-40}
LIMIT=${LIMIT:-}                  # cap every training conversion at N examples (smoke tests; probes and evaluations: EVAL_LIMIT, RECALL_LIMIT)
EVAL_LIMIT=${EVAL_LIMIT:-60}      # EVAL_LIMIT=200 RECALL_LIMIT=200: the model card's NQ rows and HotpotQA pools (its Oracle rows: the 57 held out)
CONTROL_SHIFTS=${CONTROL_SHIFTS:-1 2 3}  # the control reads the documents of the row this many on (F1 averaged)
RECALL_LIMIT=${RECALL_LIMIT:-40}
# what this run does: rows (convert the data into $OUT/rows), scp (the SCP stages), later (the
# stages after SCP, then the fp16 checkpoint), eval (the model card's evaluations)
PARTS=${PARTS:-rows scp later eval}
SCP_CHECKPOINT=${SCP_CHECKPOINT:-}  # without the scp part: the checkpoint the later stages start from (default: $OUT's)

part() {  # NAME: whether PARTS names it
    [[ " $PARTS " == *" $1 "* ]]
}
for name in $PARTS; do
    if ! [[ " rows scp later eval " == *" $name "* ]]; then
        echo "PARTS: unknown part $name (rows, scp, later, eval)" >&2
        exit 2
    fi
done

check_split() {  # BATCH_NAME ACCUM_NAME: a step's rows must split into equal micro-batches
    if ! [[ ${!1} =~ ^[1-9][0-9]*$ && ${!2} =~ ^[1-9][0-9]*$ ]] || (( ${!1} % ${!2} )); then
        echo "$1 (${!1}) must split into $2 (${!2}) equal micro-batches" >&2
        exit 2
    fi
}
check_split SCP_BATCH SCP_ACCUM
if [ "$SCP_MORE_STEPS" -gt 0 ]; then check_split SCP_MORE_BATCH SCP_MORE_ACCUM; fi
check_split RETRIEVAL_BATCH RETRIEVAL_ACCUM
rows="$OUT/rows"
mkdir -p "$rows" "$OUT/eval"
# what the evaluations and the first probes read, held out of every training file (MuSiQue asks NQ
# dev 92 again as a hop; a 2Wiki train passage repeats most of a gold passage of HotpotQA dev 186).
# The HotpotQA probe (dev 669-684) is no first N: no training file repeated it when checked.
held_out=(--held-out "$DATA/nq/dev.jsonl:300" --held-out "$DATA/hotpotqa/dev.json:200"
          --held-out "$DATA/corpus/dpr_wiki_1000.jsonl:16")
convert() {  # clara convert-data, each capped at LIMIT examples; one with its own --limit keeps the smaller
    local args=("$@" "${held_out[@]}") i
    if [ -n "$LIMIT" ]; then
        for ((i = 0; i < ${#args[@]}; i++)); do
            if [ "${args[i]}" = --limit ]; then
                if (( args[i + 1] > LIMIT )); then args[i + 1]=$LIMIT; fi
                clara convert-data "${args[@]}"
                return
            fi
        done
        args+=(--limit "$LIMIT")
    fi
    clara convert-data "${args[@]}"
}
fp16() {  # CHECKPOINT FOLDER: the checkpoint's weights in float16, without its trainer state
    python -c "import sys, torch; from clara_plugins import ClaraModel
ClaraModel.from_pretrained(sys.argv[1], device='cpu').save_pretrained(sys.argv[2], dtype=torch.float16)" "$1" "$2"
}
shuffle() {  # stdin's lines in a seeded random order
    python -c "import random, sys; rows = sys.stdin.readlines(); random.Random(0).shuffle(rows); sys.stdout.writelines(rows)"
}

if part rows; then
# 1. Data. NQ dev examples 0-299 are held out for evaluation; training uses 300 on. DPR
#    passages 0-15 and NQ dev 0-15 are the held-out probes of the reading gain.
#    SCP without a teacher: NQ's human-written questions over their gold passage, and corpus
#    passages to reconstruct, to continue from their first half, and with a name, number or
#    date blanked out (cloze). Teacher-written rows from `clara synth` can be appended.
dpr="$DATA/corpus/dpr_wiki_1000.jsonl"
musique="$DATA/corpus/musique_train_1890.json"
clara convert-data "$dpr" "$rows/probe_reconstruct.jsonl" --kind reconstruct --limit 16  # never LIMIT: the probes are passages 0-15
clara convert-data "$DATA/nq/dev.jsonl" "$rows/probe_qa.jsonl" --setting oracle -k 1 --limit 16
convert "$dpr" "$rows/scp_reconstruct.jsonl" --kind reconstruct --skip 16
convert "$dpr" "$rows/scp_continue_dpr.jsonl" --kind continue --skip 16
convert "$musique" "$rows/scp_continue_musique.jsonl" --kind continue --limit 700
convert "$dpr" "$rows/scp_cloze_dpr.jsonl" --kind cloze --skip 16
convert "$musique" "$rows/scp_cloze_musique.jsonl" --kind cloze
convert "$DATA/nq/dev.jsonl" "$rows/scp_nq.jsonl" --setting oracle -k 1 --skip 300
cat "$rows"/scp_{reconstruct,continue_dpr,continue_musique,cloze_dpr,cloze_musique,nq}.jsonl | shuffle > "$rows/scp.jsonl"

convert "$DATA/hotpotqa/train.json" "$rows/instruct_hotpotqa.jsonl" --setting oracle
convert "$DATA/2wikimultihopqa/train.json" "$rows/instruct_2wiki.jsonl" --setting oracle
convert "$DATA/musique/train.jsonl" "$rows/instruct_musique.jsonl" --setting oracle
convert "$DATA/nq/dev.jsonl" "$rows/instruct_nq.jsonl" --setting oracle --skip 300
cat "$rows"/instruct_{hotpotqa,2wiki,musique,nq}.jsonl > "$rows/instruct.jsonl"

convert "$DATA/hotpotqa/train.json" "$rows/e2e_hotpotqa.jsonl" --kind e2e --candidates 20
convert "$DATA/2wikimultihopqa/train.json" "$rows/e2e_2wiki.jsonl" --kind e2e --candidates 20
convert "$DATA/musique/train.jsonl" "$rows/e2e_musique.jsonl" --kind e2e --candidates 20
# The retrieval stage: every training question with its gold passages and the BM25-best others
# (5 candidates), the other questions' candidates as negatives; also the dev questions no
# evaluation reads (HotpotQA dev 200-668: 0-199 are evaluated, 669-684 are the probe; 2Wiki and
# MuSiQue dev), less those without a gold passage in their pool (the stage needs one) and any
# with a candidate titled as a gold passage of HotpotQA dev 0-199.
convert "$DATA/hotpotqa/train.json" "$rows/retrieval_hotpotqa.jsonl" --kind e2e --candidates 5
convert "$DATA/2wikimultihopqa/train.json" "$rows/retrieval_2wiki.jsonl" --kind e2e --candidates 5
convert "$DATA/musique/train.jsonl" "$rows/retrieval_musique.jsonl" --kind e2e --candidates 5
convert "$DATA/nq/dev.jsonl" "$rows/retrieval_nq.jsonl" --kind e2e --candidates 5 --skip 300
convert "$DATA/hotpotqa/dev.json" "$rows/retrieval_hotpotqa_dev.jsonl" --kind e2e --candidates 5 --skip 200 --limit 469
convert "$DATA/2wikimultihopqa/dev.json" "$rows/retrieval_2wiki_dev.jsonl" --kind e2e --candidates 5
convert "$DATA/musique/dev.jsonl" "$rows/retrieval_musique_dev.jsonl" --kind e2e --candidates 5
# --limit 200: short pools are filled from held-out questions only (from the whole file, rows 0-199
# held passages the retrieval stage trains on, dev 200-668's)
clara convert-data "$DATA/hotpotqa/dev.json" "$rows/eval_hotpotqa_e2e20.jsonl" --kind e2e --candidates 20 --limit 200
python -c "import json, sys
title = lambda doc: doc.split(chr(10), 1)[0].strip()
evaluated = [json.loads(l) for l in open(sys.argv[1])][:200]
gold = {title(row['docs'][i]) for row in evaluated for i in row.get('pos_index') or []}
for path in sys.argv[2:]:
    for line in open(path):
        row = json.loads(line)
        if row.get('pos_index') and not any(title(doc) in gold for doc in row['docs']):
            sys.stdout.write(line)" "$rows/eval_hotpotqa_e2e20.jsonl" "$rows"/retrieval_{hotpotqa,2wiki,musique}_dev.jsonl \
    > "$rows/retrieval_dev.jsonl"
cat "$rows"/retrieval_{hotpotqa,2wiki,musique,nq}.jsonl | shuffle > "$rows/retrieval.jsonl"
cat "$rows/retrieval.jsonl" "$rows/retrieval_dev.jsonl" | shuffle > "$rows/retrieval_all.jsonl"
python -c "import random, sys
counts = [int(n) for n in sys.argv[2].split(',')]
for name, count in zip(['hotpotqa', '2wiki', 'musique'], counts):
    rows = open(f'{sys.argv[1]}/e2e_{name}.jsonl').readlines()
    random.Random(0).shuffle(rows)
    sys.stdout.writelines(rows[:count])" "$rows" "$E2E_ROWS" > "$rows/e2e.jsonl"

# Oracle rows need every gold passage in the example's pool: HotpotQA dev 0-199 gives 57 (the
# rows beyond come from dev 204 on, whose questions the retrieval stage trains on), NQ dev 0-299 all.
clara convert-data "$DATA/hotpotqa/dev.json" "$rows/eval_hotpotqa_oracle.jsonl" --setting oracle --limit 200
clara convert-data "$DATA/hotpotqa/dev.json" "$rows/oracle_hotpotqa_dev.jsonl" --setting oracle
clara convert-data "$DATA/nq/dev.jsonl" "$rows/eval_nq_oracle.jsonl" --setting oracle --limit 300

tail -n 16 "$rows/eval_nq_oracle.jsonl" > "$rows/probe_nq5.jsonl"
tail -n 16 "$rows/oracle_hotpotqa_dev.jsonl" > "$rows/probe_hotpot5.jsonl"  # dev 669-684
fi  # rows

# 2. Training: SCP -> (optional instruction tuning, keeping the SCP generator) -> end-to-end
#    (the query reasoner alone) -> retrieval (the query reasoner alone, in-batch negatives) ->
#    the text baseline -> instruction tuning with distillation from it (the generator alone;
#    the shipped checkpoint). SCP and the distilled stage pay a margin for reading; the probes log the
#    reading gain on held-out rows. The text reader sees ~5x the positions (up to ~2,300 tokens
#    a row): one row per forward pass with accumulation keeps its peak memory in bounds.
scp_stage() {  # OUTPUT STEPS LR BATCH ACCUM [FLAGS...]: the compressor and generator on the SCP rows
    clara train --stage scp --data "$rows/scp.jsonl" --output "$1" --steps "$2" --lr "$3" \
        --batch-size $(($4 / $5)) --grad-accum "$5" --schedule "$SCP_SCHEDULE" --margin-weight "$MARGIN" \
        --save-every 20 --device "$DEVICE" \
        --probe "$rows/probe_reconstruct.jsonl" "$rows/probe_qa.jsonl" --probe-every "$PROBE_EVERY" "${@:6}"
}
scp="$OUT/scp/checkpoint"  # each stage's result, the next one's start
if [ "$SCP_MORE_STEPS" -gt 0 ]; then
    scp="$OUT/scp_more/checkpoint"
fi
if part scp; then
    if [ -n "$SCP_INIT" ]; then
        start=(--init "$SCP_INIT")
    else
        start=(--memory-design pooled)
    fi
    scp_stage "$OUT/scp" "$SCP_STEPS" "$SCP_LR" "$SCP_BATCH" "$SCP_ACCUM" --base-model "$BASE_MODEL" --compression-rate "$CR" \
        "${start[@]}"
    if [ "$SCP_MORE_STEPS" -gt 0 ]; then
        scp_stage "$OUT/scp_more" "$SCP_MORE_STEPS" "$SCP_MORE_LR" "$SCP_MORE_BATCH" "$SCP_MORE_ACCUM" \
            --init "$OUT/scp/checkpoint" --seed 1
    fi
    if ! part later; then  # the later stages run elsewhere: the SCP result in fp16, to carry there
        fp16 "$scp" "$OUT/scp-fp16"
    fi
else
    scp=${SCP_CHECKPOINT:-$scp}
fi

if part later; then
generator="$scp"
if [ "$INSTRUCT_STEPS" -gt 0 ]; then
    clara train --stage instruct --data "$rows/instruct.jsonl" --output "$OUT/instruct" --init "$scp" \
        --keep-generator $FREEZE_COMPRESSOR --steps "$INSTRUCT_STEPS" --batch-size "$BATCH" --grad-accum 1 --lr "$LR" \
        --margin-weight "$MARGIN" --save-every 20 --device "$DEVICE" \
        --probe "$rows/probe_nq5.jsonl" --probe-every "$PROBE_EVERY"
    generator="$OUT/instruct/checkpoint"
fi
clara train --stage e2e --data "$rows/e2e.jsonl" --output "$OUT/e2e" --init "$generator" \
    --retrieval-key mean --retrieval-weight "$RETRIEVAL_WEIGHT" $FREEZE_GENERATOR --steps "$E2E_STEPS" --batch-size "$E2E_BATCH" \
    --grad-accum 1 --lr "$E2E_LR" --schedule constant --save-every 20 --device "$DEVICE"
# The language-modelling loss moves the query reasoner slowly for the CPU it costs; ranking
# each question's gold passages against a whole batch's candidates, without the generator, sees
# about 7x more questions a second on CPU (docs/training-run.md, eleventh session).
reasoner="$OUT/e2e/checkpoint"
if [ "$RETRIEVAL_STEPS" -gt 0 ]; then
    clara train --stage retrieval --data "$rows/retrieval_all.jsonl" --output "$OUT/retrieval" --init "$OUT/e2e/checkpoint" \
        --steps "$RETRIEVAL_STEPS" --batch-size $((RETRIEVAL_BATCH / RETRIEVAL_ACCUM)) --grad-accum "$RETRIEVAL_ACCUM" --lr "$LR" \
        --gold-term each --save-every 20 --device "$DEVICE"
    reasoner="$OUT/retrieval/checkpoint"
fi
# The text reader (a fresh generator reading the passages as text) is the baseline and the
# teacher: the generator, reading memories, then also learns the teacher's answer distribution,
# with a higher margin target, as distillation lowers the CE from any memories.
clara train --stage text --data "$rows/instruct.jsonl" --output "$OUT/text" --base-model "$BASE_MODEL" \
    --steps "$TEXT_STEPS" --batch-size 1 --grad-accum "$BATCH" --lr "$LR" --device "$DEVICE"
distill_margin=()  # the margin's target, read with its weight only (MARGIN=0: the paper's loss)
awk "BEGIN { exit !($MARGIN > 0) }" && distill_margin=(--margin "$DISTILL_MARGIN")
distill() {  # OUTPUT FROM SEED STEPS [FLAGS...]: the generator alone, distilled from the text reader
    clara train --stage instruct --data "$rows/instruct.jsonl" --output "$1" --init "$2" \
        --keep-generator $FREEZE_COMPRESSOR --steps "$4" --batch-size "$BATCH" --grad-accum 1 --lr "$LR" \
        --seed "$3" "${distill_margin[@]}" --margin-weight "$MARGIN" --distill-weight 1.0 \
        --teacher "$OUT/text/checkpoint" --save-every 20 --device "$DEVICE" \
        --probe "$rows/probe_nq5.jsonl" "$rows/probe_hotpot5.jsonl" --probe-every "$PROBE_EVERY" "${@:5}"
}
final="$reasoner"
if [ "$DISTILL_STEPS" -gt 0 ]; then
    # Answering with a name the question holds ("Where does the Danube rise?" -> "the Danube")
    # is made to cost (docs/training-run.md, twenty-third session).
    distill "$OUT/distill" "$reasoner" 4 "$DISTILL_STEPS" --restate-weight "$DISTILL_RESTATE"
    final="$OUT/distill/checkpoint"
    if [ "$DISTILL_MORE_STEPS" -gt 0 ]; then
        distill "$OUT/distill_more" "$final" 7 "$DISTILL_MORE_STEPS"
        final="$OUT/distill_more/checkpoint"
    fi
    if [ "$RESTATE_STEPS" -gt 0 ]; then
        distill "$OUT/distill_restate" "$final" 9 "$RESTATE_STEPS" --restate-weight 1.0
        final="$OUT/distill_restate/checkpoint"
    fi
fi

# 3. The fp16 checkpoint to ship (adapters + memory-token rows, 28 MiB at CR16), written before the
#    evaluations: one that fails (a machine without the dense retriever's weights) leaves it made.
fp16 "$final" "$OUT/cr$CR-fp16"
else
final="$OUT/cr$CR-fp16"  # the evaluations alone read the last run's
fi  # later

if part eval; then
# 4. Evaluation. "text" with the text checkpoint is the fine-tuned text reader; "none" and the
#    plain "text" reader come with the CLaRa checkpoint (its base model, no adapter).
#    The control gives each question the documents of the question CONTROL_SHIFTS on, its F1
#    averaged over them; "f1_above_control" pairs it with CLaRa's.
for name in hotpotqa_oracle nq_oracle; do
    data="$rows/eval_$name.jsonl"
    clara eval "$data" --checkpoint "$final" --systems clara control text none --reading \
        --control-shifts $CONTROL_SHIFTS --limit "$EVAL_LIMIT" --device "$DEVICE" --out "$OUT/eval/${name}_clara.json"
    clara eval "$data" --checkpoint "$OUT/text/checkpoint" --systems text \
        --limit "$EVAL_LIMIT" --device "$DEVICE" --out "$OUT/eval/${name}_text_finetuned.json"
done
# "compressor" encodes the question with the (frozen) compressor: the reasoner before end-to-end.
clara eval "$rows/eval_hotpotqa_e2e20.jsonl" --checkpoint "$final" --systems \
    --retrievers compressor reasoner dense bm25 --limit "$RECALL_LIMIT" --device "$DEVICE" \
    --out "$OUT/eval/recall_hotpotqa_e2e20.json"
# The reading gain on the held-out probe rows (passages 0-15 to reconstruct, NQ dev questions)
for probe in probe_reconstruct probe_qa; do
    clara eval "$rows/$probe.jsonl" --checkpoint "$final" --systems --reading --device "$DEVICE" \
        --out "$OUT/eval/reading_$probe.json"
done

fi  # eval
echo "done: $PARTS (rows in $rows, evaluations in $OUT/eval, fp16 checkpoints in $OUT/*-fp16)"
