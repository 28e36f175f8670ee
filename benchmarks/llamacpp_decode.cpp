// Greedy decoding through llama.cpp's C API, for cfmlang's benchmarks (benchmarks/llamacpp.py
// compiles it against the libllama it built). Reads the prompt text from stdin, tokenizes
// it with the model's special tokens, and for each round: clears the KV cache, evaluates
// the prompt in one batch, then runs N single-token decode steps, each fed the argmax of
// the previous logits. Prints one JSON object: the prompt's token count and, per round,
// the prefill and decode seconds and the N greedy tokens (end-of-generation tokens
// included: the caller cuts there).
//
// With `-l LOGITS.bin` it reads token ids (whitespace-separated) from stdin instead, evaluates
// them in one batch with the logits of every position, and writes those logits to the file
// as float32 rows (one row of n_vocab values per token); it prints the token and vocabulary
// counts. This is teacher forcing: the caller compares llama.cpp's next-token logits with
// another implementation's on the same tokens.
//
//   cfm-llama-decode -m MODEL.gguf -t THREADS -n NEW_TOKENS -r ROUNDS < prompt.txt
//   cfm-llama-decode -m MODEL.gguf -t THREADS -l LOGITS.bin < token-ids.txt
#include "llama.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

static double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

static llama_token greedy(llama_context * ctx, int n_vocab) {
    const float * logits = llama_get_logits_ith(ctx, -1);
    llama_token best = 0;
    for (llama_token i = 1; i < n_vocab; ++i) {
        if (logits[i] > logits[best]) {
            best = i;
        }
    }
    return best;
}

// A context of `n_ctx` positions that evaluates up to `n_batch` tokens at once on `threads`
// threads (null, with a message, when llama.cpp cannot make one).
static llama_context * new_context(llama_model * model, int n_ctx, int n_batch, int threads) {
    llama_context_params params = llama_context_default_params();
    params.n_ctx = n_ctx;
    params.n_batch = n_batch;
    params.n_ubatch = n_batch;
    params.n_threads = threads;
    params.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, params);
    if (ctx == nullptr) {
        std::fprintf(stderr, "cannot create a context\n");
    }
    return ctx;
}

// The logits of every position of `tokens`, evaluated in one batch, written to `path`.
static int forced_logits(llama_model * model, const std::vector<llama_token> & tokens, int threads,
                         const std::string & path) {
    const int n = static_cast<int>(tokens.size());
    llama_context * ctx = new_context(model, n + 1, n, threads);
    if (ctx == nullptr) {
        return 1;
    }
    llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; ++i) {
        batch.token[i] = tokens[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) {
        std::fprintf(stderr, "evaluating the tokens failed\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * out = std::fopen(path.c_str(), "wb");
    if (out == nullptr) {
        std::fprintf(stderr, "cannot write %s\n", path.c_str());
        return 1;
    }
    for (int i = 0; i < n; ++i) {
        std::fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, out);
    }
    std::fclose(out);
    std::printf("{\"tokens\": %d, \"vocab\": %d}\n", n, n_vocab);
    llama_batch_free(batch);
    llama_free(ctx);
    return 0;
}

int main(int argc, char ** argv) {
    std::string model_path, logits_path;
    int threads = 1, new_tokens = 32, rounds = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string key = argv[i];
        if (key == "-m") {
            model_path = argv[i + 1];
        } else if (key == "-t") {
            threads = std::atoi(argv[i + 1]);
        } else if (key == "-n") {
            new_tokens = std::atoi(argv[i + 1]);
        } else if (key == "-r") {
            rounds = std::atoi(argv[i + 1]);
        } else if (key == "-l") {
            logits_path = argv[i + 1];
        } else {
            std::fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (model_path.empty() || threads < 1 || new_tokens < 1 || rounds < 1) {
        std::fprintf(stderr, "usage: %s -m MODEL.gguf -t THREADS (-n NEW_TOKENS -r ROUNDS < prompt | "
                     "-l LOGITS.bin < token-ids)\n", argv[0]);
        return 2;
    }
    const std::string prompt((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());

    llama_log_set([](enum ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), model_params);
    if (model == nullptr) {
        std::fprintf(stderr, "cannot load %s\n", model_path.c_str());
        return 1;
    }
    if (!logits_path.empty()) {
        std::vector<llama_token> tokens;
        for (const char * cursor = prompt.c_str(); *cursor;) {
            char * end = nullptr;
            const long id = std::strtol(cursor, &end, 10);
            if (end == cursor) {
                break;
            }
            tokens.push_back(static_cast<llama_token>(id));
            cursor = end;
        }
        if (tokens.empty()) {
            std::fprintf(stderr, "no token ids on stdin\n");
            return 1;
        }
        const int status = forced_logits(model, tokens, threads, logits_path);
        llama_model_free(model);
        return status;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_prompt = -llama_tokenize(vocab, prompt.c_str(), prompt.size(), nullptr, 0, true, true);
    std::vector<llama_token> prompt_tokens(n_prompt);
    if (n_prompt < 1 || llama_tokenize(vocab, prompt.c_str(), prompt.size(), prompt_tokens.data(), n_prompt,
                                       true, true) < 0) {
        std::fprintf(stderr, "cannot tokenize the prompt\n");
        return 1;
    }

    llama_context * ctx = new_context(model, n_prompt + new_tokens + 1, n_prompt, threads);
    if (ctx == nullptr) {
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(vocab);

    std::printf("{\"prompt_tokens\": %d, \"threads\": %d, \"rounds\": [", n_prompt, threads);
    for (int round = 0; round < rounds; ++round) {
        llama_memory_clear(llama_get_memory(ctx), true);
        auto start = std::chrono::steady_clock::now();
        if (llama_decode(ctx, llama_batch_get_one(prompt_tokens.data(), n_prompt)) != 0) {
            std::fprintf(stderr, "prompt evaluation failed\n");
            return 1;
        }
        llama_token token = greedy(ctx, n_vocab);
        const double prefill = seconds_since(start);
        std::vector<llama_token> generated;
        start = std::chrono::steady_clock::now();
        for (int step = 0; step < new_tokens; ++step) {
            generated.push_back(token);
            if (llama_decode(ctx, llama_batch_get_one(&token, 1)) != 0) {
                std::fprintf(stderr, "decode step %d failed\n", step);
                return 1;
            }
            token = greedy(ctx, n_vocab);
        }
        const double decode = seconds_since(start);
        std::printf("%s{\"prefill_s\": %.6f, \"decode_s\": %.6f, \"tokens\": [", round ? ", " : "", prefill, decode);
        for (size_t i = 0; i < generated.size(); ++i) {
            std::printf("%s%d", i ? ", " : "", generated[i]);
        }
        std::printf("]}");
    }
    std::printf("]}\n");
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
