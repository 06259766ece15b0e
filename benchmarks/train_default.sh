#!/usr/bin/env bash
# Train and evaluate the default CLaRa checkpoint (SmolLM2-135M-Instruct, CR16) from ../shared/data.
#
# The paper's three stages, the fine-tuned text baseline, then the model card's numbers:
# F1 of CLaRa vs no retrieval vs text reading (HotpotQA Oracle and NQ dev 0-299, both held out),
# the reading check, and Recall@5 of the query reasoner before and after the end-to-end stage
# vs all-MiniLM-L6-v2 on 20-candidate pools. The defaults are the CPU recipe of the checkpoint
# shipped in clara_plugins/checkpoints (docs/model-card.md: about 2.5 h on 2 cores); sizes come
# from the environment, so that a GPU run and the smoke test (tests/test_train_default.py) are
# the same script:
#
#   bash benchmarks/train_default.sh                              # the shipped checkpoint
#   DEVICE=cuda SCP_STEPS=5000 INSTRUCT_STEPS=1000 E2E_STEPS=300 TEXT_STEPS=1000 BATCH=16 \
#       LR=1e-4 E2E_LR=5e-6 FREEZE_COMPRESSOR= EVAL_LIMIT=319 RECALL_LIMIT=200 bash benchmarks/train_default.sh
#
# Results: $OUT/eval/*.json; the shippable fp16 adapters: $OUT/cr16-fp16.
set -euo pipefail

DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/default}
DEVICE=${DEVICE:-auto}
BASE_MODEL=${BASE_MODEL:-smollm2-135m-instruct}
SCP_STEPS=${SCP_STEPS:-300}
INSTRUCT_STEPS=${INSTRUCT_STEPS:-200}
TEXT_STEPS=${TEXT_STEPS:-50}      # a text step costs ~2x a frozen-compressor instruct step on CPU
E2E_STEPS=${E2E_STEPS:-15}
BATCH=${BATCH:-4}
E2E_BATCH=${E2E_BATCH:-2}         # each end-to-end row compresses its 20 candidates
LR=${LR:-2e-4}
E2E_LR=${E2E_LR:-2e-5}
FREEZE_COMPRESSOR=${FREEZE_COMPRESSOR---freeze-compressor}  # instruct stage; empty: train it (paper)
LIMIT=${LIMIT:-}                  # cap every converted file at N examples (smoke tests)
EVAL_LIMIT=${EVAL_LIMIT:-100}
RECALL_LIMIT=${RECALL_LIMIT:-200}

rows="$OUT/rows"
mkdir -p "$rows" "$OUT/eval"
limit=(${LIMIT:+--limit "$LIMIT"})
convert() { clara convert-data "$@" "${limit[@]}"; }

# 1. Data. NQ dev examples 0-299 are held out for evaluation; training uses 300 on.
#    SCP without a teacher: NQ's human-written QA over its gold passage, and reconstruction of
#    corpus passages. Teacher-written rows from `clara synth` can be appended to scp.jsonl.
convert "$DATA/nq/dev.jsonl" "$rows/scp_nq.jsonl" --kind scp --skip 300
convert "$DATA/corpus/dpr_wiki_1000.jsonl" "$rows/reconstruct_dpr.jsonl" --kind reconstruct
cat "$rows/scp_nq.jsonl" "$rows/reconstruct_dpr.jsonl" > "$rows/scp.jsonl"

convert "$DATA/hotpotqa/train.json" "$rows/instruct_hotpotqa.jsonl" --setting oracle
convert "$DATA/2wikimultihopqa/train.json" "$rows/instruct_2wiki.jsonl" --setting oracle
convert "$DATA/musique/train.jsonl" "$rows/instruct_musique.jsonl" --setting oracle
convert "$DATA/nq/dev.jsonl" "$rows/instruct_nq.jsonl" --setting oracle --skip 300
cat "$rows"/instruct_{hotpotqa,2wiki,musique,nq}.jsonl > "$rows/instruct.jsonl"

convert "$DATA/hotpotqa/train.json" "$rows/e2e_hotpotqa.jsonl" --kind e2e --candidates 20
convert "$DATA/2wikimultihopqa/train.json" "$rows/e2e_2wiki.jsonl" --kind e2e --candidates 20
convert "$DATA/musique/train.jsonl" "$rows/e2e_musique.jsonl" --kind e2e --candidates 20
cat "$rows"/e2e_{hotpotqa,2wiki,musique}.jsonl > "$rows/e2e.jsonl"

clara convert-data "$DATA/hotpotqa/dev.json" "$rows/eval_hotpotqa_oracle.jsonl" --setting oracle
clara convert-data "$DATA/nq/dev.jsonl" "$rows/eval_nq_oracle.jsonl" --setting oracle --limit 300
clara convert-data "$DATA/hotpotqa/dev.json" "$rows/eval_hotpotqa_e2e20.jsonl" --kind e2e --candidates 20

# 2. Training: SCP -> instruction tuning (fresh generator) -> end-to-end; and the text baseline.
#    The text reader sees ~5x the positions (up to ~2,300 tokens a row): one row per forward
#    pass with accumulation keeps its peak memory in bounds (4 rows at once took 21 GB).
clara train --stage scp --data "$rows/scp.jsonl" --output "$OUT/scp" --base-model "$BASE_MODEL" \
    --compression-rate 16 --steps "$SCP_STEPS" --batch-size "$BATCH" --grad-accum 1 --lr "$LR" --device "$DEVICE"
clara train --stage instruct --data "$rows/instruct.jsonl" --output "$OUT/instruct" --init "$OUT/scp/checkpoint" \
    $FREEZE_COMPRESSOR --steps "$INSTRUCT_STEPS" --batch-size "$BATCH" --grad-accum 1 --lr "$LR" --device "$DEVICE"
clara train --stage e2e --data "$rows/e2e.jsonl" --output "$OUT/e2e" --init "$OUT/instruct/checkpoint" \
    --steps "$E2E_STEPS" --batch-size "$E2E_BATCH" --grad-accum 1 --lr "$E2E_LR" --schedule constant --device "$DEVICE"
clara train --stage text --data "$rows/instruct.jsonl" --output "$OUT/text" --base-model "$BASE_MODEL" \
    --steps "$TEXT_STEPS" --batch-size 1 --grad-accum "$BATCH" --lr "$LR" --device "$DEVICE"

# 3. Evaluation. "text" with the text checkpoint is the fine-tuned text reader; "none" and the
#    plain "text" reader come with the CLaRa checkpoint (its base model, no adapter).
for name in hotpotqa_oracle nq_oracle; do
    data="$rows/eval_$name.jsonl"
    clara eval "$data" --checkpoint "$OUT/e2e/checkpoint" --systems clara text none --reading \
        --limit "$EVAL_LIMIT" --device "$DEVICE" --out "$OUT/eval/${name}_clara.json"
    clara eval "$data" --checkpoint "$OUT/text/checkpoint" --systems text \
        --limit "$EVAL_LIMIT" --device "$DEVICE" --out "$OUT/eval/${name}_text_finetuned.json"
done
# "compressor" encodes the question with the (frozen) compressor: the reasoner before end-to-end.
clara eval "$rows/eval_hotpotqa_e2e20.jsonl" --checkpoint "$OUT/e2e/checkpoint" --systems \
    --retrievers compressor reasoner dense bm25 --limit "$RECALL_LIMIT" --device "$DEVICE" \
    --out "$OUT/eval/recall_hotpotqa_e2e20.json"

# 4. The fp16 checkpoint to ship (adapters + memory-token rows, 28 MiB at CR16).
python -c "import sys, torch; from clara_plugins import ClaraModel
ClaraModel.from_pretrained(sys.argv[1], device='cpu').save_pretrained(sys.argv[2], dtype=torch.float16)" \
    "$OUT/e2e/checkpoint" "$OUT/cr16-fp16"
echo "done: evaluations in $OUT/eval, fp16 checkpoint in $OUT/cr16-fp16"
