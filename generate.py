"""Generate music from text with MusicGen on MLX.

    python generate.py --text "80s pop track with bassy drums and synth" --duration 8 --output out.wav
"""

import argparse
import sys
from pathlib import Path

import mlx_musicgen  # noqa: F401  (first: loads an optimized BLAS before mlx on Linux)
from mlx_musicgen.audio import check_output, check_prompt, peak_normalize, read_audio, write_audio
from mlx_musicgen.cli import progress_bar, run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="facebook/musicgen-small",
                   help="Hub id, Hub-layout folder or converted folder (default: facebook/musicgen-small)")
    p.add_argument("--text", help="what the music should be; leave out for unconditional music")
    p.add_argument("--audio-prompt", help="a wav/flac/ogg file to continue (the output starts with it)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds of audio in all, an audio prompt included (default 10)")
    p.add_argument("--output", default="musicgen.wav", help="a .wav or .flac file (default musicgen.wav)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--seed", type=int, help="the same seed gives the same music")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance (default 3)")
    p.add_argument("--top-k", type=int, default=250, help="sample from the k most likely codes (0: off; default 250)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling threshold (0: off)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely code")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="decoder precision when loading an unconverted model")
    p.add_argument("--bits", choices=["16", "24", "float"], default="16", help="sample format (default 16)")
    p.add_argument("--no-normalize", action="store_true", help="write the raw level instead of peak -1 dBFS")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    import mlx.core as mx

    from mlx_musicgen import MusicGen
    from mlx_musicgen.model import check_duration, check_sampling

    # Everything that can be checked without the model fails here, before the (slow) load.
    output = check_output(args.output, overwrite=args.overwrite, bits=args.bits)
    check_duration(args.duration)
    check_sampling(guidance_scale=args.guidance_scale, top_k=args.top_k, top_p=args.top_p,
                   temperature=args.temperature)
    if args.text is not None and not args.text.strip():
        print("note: the text is empty: generating unconditional music.", file=sys.stderr)
        args.text = None
    if args.audio_prompt:
        check_prompt(*read_audio(args.audio_prompt), f"audio prompt {args.audio_prompt}")

    dtype = {None: None, "float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[args.dtype]
    model = MusicGen.from_pretrained(args.model, dtype=dtype)
    check_sampling(guidance_scale=args.guidance_scale, top_k=args.top_k, top_p=args.top_p,
                   temperature=args.temperature, vocab_size=model.config.decoder.vocab_size)
    bar, update = progress_bar(args.duration, "generating")
    with bar:
        audio = model.generate(
            [args.text] if args.text else None,
            audio_prompt=args.audio_prompt,
            duration=args.duration,
            do_sample=not args.greedy,
            guidance_scale=args.guidance_scale,
            top_k=args.top_k,
            top_p=args.top_p,
            temperature=args.temperature,
            seed=args.seed,
            progress=None if args.quiet else update,
        )[0]
    if not args.no_normalize:
        audio = peak_normalize(audio)
    write_audio(output, audio, model.sampling_rate, bits=args.bits)
    seconds = audio.shape[-1] / model.sampling_rate
    print(f"wrote {output} ({seconds:.2f} s, {model.sampling_rate} Hz, {audio.shape[0]} channel(s))", file=sys.stderr)


if __name__ == "__main__":
    args = parse_args()
    run_main(lambda: main(args), args.debug)
