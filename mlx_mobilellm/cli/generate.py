"""`mlx-mobilellm generate` and `mlx-mobilellm chat`."""

from __future__ import annotations

import argparse
import sys

from ..errors import CheckpointError
from .options import Option, add_options, dtype_option


MODEL_OPTIONS = (
    Option("model", None, "MLX folder, Hugging Face folder, .gguf file or hub repo id "
           "(default: the built-in SmolLM2-135M-Instruct demo model)", str),
    dtype_option("compute dtype; default: the checkpoint's, or float32 on a CPU with a fast BLAS "
                 "(see mlx_mobilellm/compute_dtype.py)"),
    Option("adapter_path", None, "a folder of fine-tuned LoRA/DoRA adapters (from `mlx-mobilellm "
           "lora`) to apply to --model", str),
    Option("draft_model", None, "a smaller model with the same tokenizer for speculative "
           "decoding", str),
    Option("num_draft_tokens", 3, "tokens the draft model proposes at a time", int),
)
SAMPLING_OPTIONS = (
    Option("max_tokens", 256, "tokens to generate at most", int, flags=("--max-tokens", "-m")),
    Option("temp", 0.0, "sampling temperature; 0 is greedy", float),
    Option("top_p", 1.0, "nucleus sampling: the smallest set of tokens with this probability",
           float),
    Option("top_k", 0, "sample among the k most likely tokens; 0: all", int),
    Option("min_p", 0.0, "drop tokens less likely than min_p x the most likely one", float),
    Option("repetition_penalty", None, "divide the logits of recent tokens by this", float),
    Option("repetition_context_size", 20, "how many recent tokens the penalty sees", int),
    Option("seed", None, "random seed for sampling", int),
    Option("stop", (), "a stop string (repeatable)", str, repeatable=True),
    Option("max_kv_size", None, "bound the KV cache (long chats)", int),
    Option("system", None, "a system message for the chat template", str),
)
GENERATE_OPTIONS = (
    Option("prompt", None, "the prompt; - reads standard input", str, flags=("--prompt", "-p"),
           required=True),
    Option("ignore_chat_template", False, "use the prompt as plain text even if the model has a "
           "chat template"),
    Option("verbose", False, "print speed and memory at the end"),
)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, MODEL_OPTIONS + GENERATE_OPTIONS[:1] + SAMPLING_OPTIONS
                + GENERATE_OPTIONS[1:])


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, MODEL_OPTIONS + SAMPLING_OPTIONS)


def _check_values(args) -> None:
    """Every flag's value, before a model loads. The library checks what it takes as parameters
    (its messages name those); this adds the bounds only the command line sets."""
    from ..generate import MAX_DRAFT_TOKENS
    from ..input_checks import check_text
    from ..sampling import check_seed, make_logits_processors, make_sampler

    if args.system is not None:
        check_text(args.system, "--system")
    if args.max_tokens < 1:
        raise CheckpointError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.max_kv_size is not None and args.max_kv_size < 8:
        raise CheckpointError(f"--max-kv-size must be at least 8, got {args.max_kv_size}")
    if args.draft_model and args.max_kv_size is not None:
        # A bounded cache cannot take back rejected draft tokens: every turn would fail.
        raise CheckpointError("--draft-model needs an unbounded KV cache; drop --max-kv-size "
                              "or --draft-model")
    if not 1 <= args.num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise CheckpointError(f"--num-draft-tokens must be in [1, {MAX_DRAFT_TOKENS}], got "
                              f"{args.num_draft_tokens}")
    try:
        make_sampler(args.temp, args.top_p, args.top_k, args.min_p)
        make_logits_processors(args.repetition_penalty, args.repetition_context_size)
        if args.seed is not None:
            check_seed(args.seed)
    except ValueError as error:
        raise CheckpointError(str(error)) from None


def launched():
    """The process group: several processes when mlx.launch started this command."""
    from ..training.distributed import world

    return world()


def is_printing() -> bool:
    """Launched on several processes, only rank 0 prints what the command answers."""
    return launched().rank() == 0


def one_process_only(command: str) -> None:
    if launched().size() > 1:
        raise CheckpointError(f"{command} runs in one process; of the commands mlx.launch starts "
                              "on several, generate and evaluate split a model over them")


def load_for_generation(spec, dtype, adapter_path=None):
    """(model, tokenizer). Launched on several processes, the model's blocks are split over
    them before any weight is read (models/pipeline.py): each holds its share."""
    from ..compute_dtype import slow_blas_note
    from ..demo import demo_model_path
    from ..loading import load
    from ..models.pipeline import split_into_stages

    model, tokenizer = load(spec or demo_model_path(), dtype or "auto", adapter_path)
    if tokenizer is None:
        raise CheckpointError(f"{spec}: has no tokenizer files; generation needs one")
    try:
        split_into_stages(model, launched())
    except ValueError as error:  # more processes than blocks
        raise CheckpointError(f"{spec or 'the demo model'}: {error}") from None
    note = slow_blas_note()
    if note and is_printing():
        print(note, file=sys.stderr)
    return model, tokenizer


# Text whose token ids tell tokenizers apart: words, digits, accents, CJK, emoji.
TOKENIZER_PROBE = "Hello world! 1234 café 你好 🦙 <|im_end|>"


def load_models(args):
    """(model, tokenizer, draft model or None)."""
    from ..generate import check_draft_model

    model, tokenizer = load_for_generation(args.model, args.dtype, args.adapter_path)
    if not args.draft_model:
        return model, tokenizer, None
    if launched().size() > 1:
        raise CheckpointError("--draft-model runs in one process: split over several, every "
                              "draft token would cross the machines twice; drop it")
    draft, draft_tokenizer = load_for_generation(args.draft_model, args.dtype)
    if draft_tokenizer.encode(TOKENIZER_PROBE) != tokenizer.encode(TOKENIZER_PROBE):
        raise CheckpointError(f"--draft-model {args.draft_model}: its tokenizer is not the one "
                              "of --model; a draft model must share the model's tokenizer")
    try:
        check_draft_model(model, draft, args.num_draft_tokens)
    except ValueError as error:
        raise CheckpointError(f"--draft-model {args.draft_model}: {error}") from None
    return model, tokenizer, draft


def _options(args) -> dict:
    return dict(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty,
                repetition_context_size=args.repetition_context_size, stop=args.stop,
                max_kv_size=args.max_kv_size, num_draft_tokens=args.num_draft_tokens)


def _messages(system, user_text):
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": user_text}]


def _stdin_is_closed(command: str) -> CheckpointError:
    return CheckpointError(f"{command} reads standard input, which is closed; pipe the text in "
                           "(or run it in a terminal)")


def _read_prompt(args) -> str:
    """--prompt TEXT, or standard input for --prompt -, as text a tokenizer takes."""
    from ..input_checks import check_text

    if args.prompt != "-":
        return check_text(args.prompt, "--prompt")
    if sys.stdin is None:
        raise _stdin_is_closed("--prompt -")
    try:
        return check_text(sys.stdin.read(), "--prompt - (standard input)")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"--prompt -: standard input is not UTF-8 text ({error.reason} at "
                              f"byte {error.start})") from None
    except OSError as error:
        raise CheckpointError(f"--prompt -: cannot read standard input "
                              f"({error.strerror or error})") from None


def run_generate(args) -> None:
    from ..generate import format_stats, stream_generate

    _check_values(args)
    prompt = _read_prompt(args)
    model, tokenizer, draft = load_models(args)
    if tokenizer.chat_template and not args.ignore_chat_template:
        prompt = tokenizer.apply_chat_template(_messages(args.system, prompt))
    response, printing = None, is_printing()
    try:
        # Split over processes, every rank runs this same loop (each step is a collective).
        for response in stream_generate(model, tokenizer, prompt, args.max_tokens, seed=args.seed,
                                        draft_model=draft, **_options(args)):
            if printing:
                print(response.text, end="", flush=True)
    except ValueError as error:  # a prompt longer than the context, ...
        raise CheckpointError(str(error)) from None
    if not printing:
        return
    print(flush=True)
    if args.verbose and response is not None:
        print(format_stats(response), file=sys.stderr)


def _read_line():
    """The next line typed, "" for one that could not be read as text (said on stderr), None at
    the end of input."""
    from ..input_checks import check_text

    try:
        return check_text(input(">> "), "the line")
    except EOFError:
        print()
        return None
    except KeyboardInterrupt:
        print()
        return ""
    except UnicodeDecodeError as error:  # stdin decoded strictly (a UTF-8 locale)
        print(f"error: standard input is not UTF-8 text ({error.reason}); the line was skipped",
              file=sys.stderr)
        return ""
    except CheckpointError as error:  # undecodable bytes kept as surrogates (a C locale)
        print(f"error: {error}; it was skipped", file=sys.stderr)
        return ""
    except OSError as error:
        raise CheckpointError(f"chat: cannot read standard input ({error.strerror})") from None


def run_chat(args) -> None:
    from .running import one_line

    from ..generate import PromptCache, format_stats, stream_generate

    _check_values(args)
    one_process_only("chat")
    if sys.stdin is None:
        raise _stdin_is_closed("chat")
    model, tokenizer, draft = load_models(args)
    if args.seed is not None:
        import mlx.core as mx

        mx.random.seed(args.seed)
    options = _options(args)

    def new_session():
        return ([{"role": "system", "content": args.system}] if args.system else [],
                PromptCache.for_model(model, args.max_kv_size))

    history, cache = new_session()
    print("chat: /reset starts over, /exit (or Ctrl-D) quits, Ctrl-C stops an answer", file=sys.stderr)
    while True:
        line = _read_line()
        if line is None or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history, cache = new_session()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        answer, response = "", None
        try:
            prompt = (tokenizer.apply_chat_template(history) if tokenizer.chat_template
                      else tokenizer.encode(line))
            for response in stream_generate(model, tokenizer, prompt, args.max_tokens,
                                            prompt_cache=cache, draft_model=draft, **options):
                print(response.text, end="", flush=True)
                answer += response.text
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except ValueError as error:  # the template refused the turn, it outgrew the context, ...
            print(f"error: {one_line(error)}", file=sys.stderr)
            history.pop()  # the session goes on without the turn
            continue
        print()
        history.append({"role": "assistant", "content": answer})
        if response is not None:
            print(format_stats(response), file=sys.stderr)
