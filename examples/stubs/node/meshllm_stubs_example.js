'use strict';
// Calling meshllm's Generation service from Node with @grpc/grpc-js and @grpc/proto-loader, the
// .proto files loaded at run time. docs/stubs.md shows the regions between [START name] and
// [END name]; tests/e2e/test_stubs_node.py runs this file's command line against a real router:
//
//   MESHLLM_API_KEY=... node meshllm_stubs_example.js stream 127.0.0.1:50051 '{"model": "demo", "prompt": "hi"}'
//
// Commands: stream, generate (retries by RetryInfo), first-chunks (cancels after a few chunks).
// It prints one JSON object: {"ok": true, ...} or {"ok": false, "failure": ...} (exit status 1).

// [START load]
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const googleProtos = require('google-proto-files');

// meshllm's .proto files (protos/ in the repository) and Google's (google/rpc/*.proto)
const INCLUDE_DIRS = [
  path.resolve(__dirname, '..', '..', '..', 'protos'),
  path.join(googleProtos.getProtoPath(), '..'),
];

function connect(target) {
  const definition = protoLoader.loadSync('meshllm/api/v1/generation.proto', {
    includeDirs: INCLUDE_DIRS,
    keepCase: true, // field names as in the .proto: max_tokens, finish_reason
    enums: String, // finish_reason: 'FINISH_REASON_STOP'
    longs: Number,
    defaults: true,
  });
  const { Generation } = grpc.loadPackageDefinition(definition).meshllm.api.v1;
  // TLS: grpc.credentials.createSsl(fs.readFileSync('ca.pem'))
  return new Generation(target, grpc.credentials.createInsecure());
}

// The router reads the API key from the `authorization` metadata, as `Bearer <key>`.
function auth(apiKey) {
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${apiKey}`);
  return metadata;
}
// [END load]

// [START errors]
// google.rpc.Status and the detail messages, to decode `grpc-status-details-bin`
const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (origin, target) =>
  INCLUDE_DIRS.map((dir) => path.join(dir, target)).find(fs.existsSync) ?? target;
rpcTypes.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
const Status = rpcTypes.lookupType('google.rpc.Status');

class CallFailed extends Error {
  // partialText: what a stream sent before it broke, never a whole reply
  constructor(failure, partialText = '') {
    super(`${failure.code}: ${failure.message}`);
    this.failure = failure;
    this.partialText = partialText;
  }
}

function decodeFailure(err) {
  const failure = {
    code: grpc.status[err.code], // 'RESOURCE_EXHAUSTED', ...
    message: err.details,
    reason: '', // ErrorInfo.reason, e.g. QUOTA_EXCEEDED, STREAM_INTERRUPTED
    error_metadata: {}, // ErrorInfo.metadata
    retry_after_s: null, // RetryInfo.retry_delay: wait this long, then retry
    field_violations: [], // BadRequest: [field, description]
    quota_violations: [], // QuotaFailure: [subject, description]
  };
  const [bin] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!bin) return failure; // no details attached
  for (const any of Status.decode(bin).details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = rpcTypes.lookupType(typeName);
    const detail = type.toObject(type.decode(any.value), { longs: Number, defaults: true });
    if (typeName === 'google.rpc.ErrorInfo') {
      failure.reason = detail.reason;
      failure.error_metadata = detail.metadata;
    } else if (typeName === 'google.rpc.RetryInfo') {
      failure.retry_after_s = detail.retry_delay.seconds + detail.retry_delay.nanos / 1e9;
    } else if (typeName === 'google.rpc.BadRequest') {
      failure.field_violations = detail.field_violations.map((v) => [v.field, v.description]);
    } else if (typeName === 'google.rpc.QuotaFailure') {
      failure.quota_violations = detail.violations.map((v) => [v.subject, v.description]);
    }
  }
  return failure;
}
// [END errors]

// [START stream]
function rateLimits(metadata) {
  const limits = {};
  for (const [key, value] of Object.entries(metadata.getMap())) {
    if (key.startsWith('x-ratelimit-')) limits[key] = String(value);
  }
  return limits;
}

function deadline(timeoutS) {
  return { deadline: Date.now() + timeoutS * 1000 };
}

async function stream(client, request, { apiKey, timeoutS, onText }) {
  const call = client.GenerateStream(request, auth(apiKey), deadline(timeoutS));
  let limits = {};
  call.on('metadata', (metadata) => {
    limits = rateLimits(metadata); // x-ratelimit-* (a router with quotas)
  });
  const parts = [];
  let last = null;
  try {
    for await (const chunk of call) {
      parts.push(chunk.text);
      onText(chunk.text);
      // only the last chunk has finish_reason, usage and timing
      if (chunk.finish_reason !== 'FINISH_REASON_UNSPECIFIED') last = chunk;
    }
  } catch (err) {
    // e.g. UNAVAILABLE with ErrorInfo STREAM_INTERRUPTED after some chunks
    throw new CallFailed(decodeFailure(err), parts.join(''));
  }
  if (last === null) {
    const incomplete = { code: 'DATA_LOSS', message: 'the stream ended without a last chunk' };
    throw new CallFailed(incomplete, parts.join(''));
  }
  return {
    text: parts.join(''),
    finish_reason: last.finish_reason,
    completion_tokens: last.usage.completion_tokens,
    rate_limits: limits,
  };
}
// [END stream]

// [START cancel]
async function firstChunks(client, request, { apiKey, timeoutS, chunks }) {
  const call = client.GenerateStream(request, auth(apiKey), deadline(timeoutS));
  // cancel() ends the call with CANCELLED, reported as an 'error' event: expected here
  call.on('error', () => {});
  const parts = [];
  try {
    for await (const chunk of call) {
      parts.push(chunk.text);
      if (parts.length === chunks) break;
    }
  } catch (err) {
    throw new CallFailed(decodeFailure(err), parts.join(''));
  } finally {
    call.cancel(); // the replica stops generating; nothing happens if the call has ended
  }
  return parts.join('');
}
// [END cancel]

// [START retry]
const RETRYABLE = new Set(['RESOURCE_EXHAUSTED', 'UNAVAILABLE']);
const sleepS = (seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));

function generateOnce(client, request, apiKey, callDeadline) {
  return new Promise((resolve, reject) => {
    let limits = {};
    const call = client.Generate(request, auth(apiKey), { deadline: callDeadline }, (err, reply) =>
      err
        ? reject(err)
        : resolve({
            text: reply.text,
            finish_reason: reply.finish_reason,
            completion_tokens: reply.usage.completion_tokens,
            rate_limits: limits,
          }),
    );
    call.on('metadata', (metadata) => {
      limits = rateLimits(metadata);
    });
  });
}

// A refusal with RetryInfo (quota, a full queue, no replica ready) is retried after the delay the
// server names, plus a little jitter; anything else fails at once. timeoutS covers every attempt.
async function generate(client, request, { apiKey, timeoutS, attempts = 4, sleep = sleepS }) {
  const callDeadline = Date.now() + timeoutS * 1000;
  for (let attempt = 1; ; attempt++) {
    let failure;
    try {
      return await generateOnce(client, request, apiKey, callDeadline);
    } catch (err) {
      failure = decodeFailure(err);
    }
    if (!RETRYABLE.has(failure.code) || failure.retry_after_s === null || attempt === attempts) {
      throw new CallFailed(failure);
    }
    const wait = failure.retry_after_s * (1 + 0.2 * Math.random());
    if (Date.now() + wait * 1000 > callDeadline) throw new CallFailed(failure);
    await sleep(wait);
  }
}
// [END retry]

async function main([command, target, requestJson, optionsJson = '{}']) {
  const client = connect(target);
  const request = JSON.parse(requestJson);
  const { timeout_s: timeoutS = 30, attempts = 4, chunks = 1 } = JSON.parse(optionsJson);
  const apiKey = process.env.MESHLLM_API_KEY ?? ''; // never on the command line
  const texts = [];
  const sleeps = [];
  const sleep = (seconds) => {
    sleeps.push(seconds);
    return sleepS(seconds);
  };
  const commands = {
    stream: () => stream(client, request, { apiKey, timeoutS, onText: (t) => texts.push(t) }),
    generate: () => generate(client, request, { apiKey, timeoutS, attempts, sleep }),
    'first-chunks': () => firstChunks(client, request, { apiKey, timeoutS, chunks }),
  };
  if (!(command in commands)) throw new Error(`unknown command ${command}: ${Object.keys(commands)}`);
  try {
    const reply = await commands[command]();
    console.log(JSON.stringify({ ok: true, reply, texts, sleeps }));
  } catch (err) {
    if (!(err instanceof CallFailed)) throw err;
    console.log(JSON.stringify({ ok: false, failure: err.failure, partial_text: err.partialText, sleeps }));
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

module.exports = { connect, auth, decodeFailure, CallFailed, stream, firstChunks, generate };

if (require.main === module) {
  main(process.argv.slice(2)).catch((err) => {
    console.error(err);
    process.exitCode = 2;
  });
}
