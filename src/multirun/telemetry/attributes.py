"""Every span and metric attribute name the package writes, in one place.

Names come from the OpenTelemetry GenAI semantic conventions where those have
one; the rest live under ``multirun.``.
"""

from __future__ import annotations

from typing import Final

# GenAI semantic conventions
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_SYSTEM: Final = "gen_ai.system"  # older name of provider, read from other instrumentations
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_WORKFLOW_NAME: Final = "gen_ai.workflow.name"
GEN_AI_AGENT_NAME: Final = "gen_ai.agent.name"
GEN_AI_AGENT_ID: Final = "gen_ai.agent.id"
GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: Final = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: Final = "gen_ai.usage.cache_creation.input_tokens"
GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: Final = "gen_ai.usage.reasoning.output_tokens"
# older names still written by some instrumentations
GEN_AI_USAGE_PROMPT_TOKENS: Final = "gen_ai.usage.prompt_tokens"
GEN_AI_USAGE_COMPLETION_TOKENS: Final = "gen_ai.usage.completion_tokens"
# OpenLLMetry's first names (Traceloop SDKs and many hand-made spans still write them)
LLM_USAGE_PROMPT_TOKENS: Final = "llm.usage.prompt_tokens"
LLM_USAGE_COMPLETION_TOKENS: Final = "llm.usage.completion_tokens"
# OpenLLMetry's kind of request (chat, completion, embedding, rerank...): its spans of a model call
# carry it from their start, and may have no gen_ai.operation.name (a failed call's has no usage)
LLM_REQUEST_TYPE: Final = "llm.request.type"
# OpenLLMetry's names of cached input and reasoning tokens
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS_OLD: Final = "gen_ai.usage.cache_read_input_tokens"
GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS_OLD: Final = "gen_ai.usage.cache_creation_input_tokens"
GEN_AI_USAGE_REASONING_TOKENS_OLD: Final = "gen_ai.usage.reasoning_tokens"
# the open GenAI cost proposal
GEN_AI_USAGE_COST_AMOUNT: Final = "gen_ai.usage.cost.amount"
GEN_AI_USAGE_COST_CURRENCY: Final = "gen_ai.usage.cost.currency"
GEN_AI_USAGE_COST_SOURCE: Final = "gen_ai.usage.cost.source"
GEN_AI_TOKEN_TYPE: Final = "gen_ai.token.type"
TOKEN_TYPE_INPUT: Final = "input"  # values of gen_ai.token.type
TOKEN_TYPE_OUTPUT: Final = "output"
OTEL_METRIC_OVERFLOW: Final = "otel.metric.overflow"  # the SDK's name of a metric's overflow series

# OpenInference (Arize) usage names, read from spans of other instrumentations
LLM_TOKEN_COUNT_PROMPT: Final = "llm.token_count.prompt"
LLM_TOKEN_COUNT_COMPLETION: Final = "llm.token_count.completion"
LLM_TOKEN_COUNT_CACHE_READ: Final = "llm.token_count.prompt_details.cache_read"
LLM_TOKEN_COUNT_CACHE_WRITE: Final = "llm.token_count.prompt_details.cache_write"
LLM_TOKEN_COUNT_REASONING: Final = "llm.token_count.completion_details.reasoning"
LLM_MODEL_NAME: Final = "llm.model_name"
LLM_PROVIDER: Final = "llm.provider"  # OpenInference: who serves the model (openai, azure, aws...)
LLM_SYSTEM: Final = "llm.system"  # OpenInference: whose model it is (openai, anthropic, vertexai...)
OPENINFERENCE_SPAN_KIND: Final = "openinference.span.kind"
OPENINFERENCE_KIND_LLM: Final = "LLM"  # the value of openinference.span.kind on a model call
OPENINFERENCE_KIND_EMBEDDING: Final = "EMBEDDING"  # ... on an embeddings call
EMBEDDING_MODEL_NAME: Final = "embedding.model_name"  # OpenInference: an embeddings call's model

# General semantic conventions
SERVER_ADDRESS: Final = "server.address"  # the host of the model's API
SERVER_PORT: Final = "server.port"  # its port, when not the scheme's default
GEN_AI_OPENAI_API_BASE: Final = "gen_ai.openai.api_base"  # OpenLLMetry: the OpenAI client's base URL
ERROR_TYPE: Final = "error.type"
ERROR_TYPE_OTHER: Final = "_OTHER"  # error.type when the error has no better name
EXCEPTION_TYPE: Final = "exception.type"  # on an exception event

# Operation names
OP_INVOKE_WORKFLOW: Final = "invoke_workflow"
OP_INVOKE_AGENT: Final = "invoke_agent"
OP_CHAT: Final = "chat"
OP_TEXT_COMPLETION: Final = "text_completion"
OP_GENERATE_CONTENT: Final = "generate_content"
OP_EMBEDDINGS: Final = "embeddings"
OP_EXECUTE_TOOL: Final = "execute_tool"
# the operations of a model call, which an instrumentation of the GenAI conventions times in
# gen_ai.client.operation.duration (not an agent's, a tool's or a workflow's)
MODEL_CALL_OPERATIONS: Final = frozenset({OP_CHAT, OP_TEXT_COMPLETION, OP_GENERATE_CONTENT, OP_EMBEDDINGS})
# the same, as OpenLLMetry's llm.request.type names them (its instrumentations time them too)
MODEL_CALL_REQUEST_TYPES: Final = frozenset({"chat", "completion", "embedding"})

# multirun: runs
RUN_ID: Final = "multirun.run.id"
RUN_NAME: Final = "multirun.run.name"
RUN_STATUS: Final = "multirun.run.status"
RUN_PARENT_ID: Final = "multirun.run.parent_id"
RUN_REPLAYING: Final = "multirun.run.replaying"
RUN_RESUMED_FROM: Final = "multirun.run.resumed_from"  # id of the run whose checkpoint this one continues
RUN_ERROR: Final = "multirun.run.error"
BUDGET_PREFIX: Final = "multirun.budget."  # + max_tokens, max_cost_usd, ...
BUDGET_EXCEEDED_LIMIT: Final = "multirun.budget.exceeded_limit"
BUDGET_LIMIT: Final = "multirun.budget.limit"  # metric attribute: max_tokens, max_cost_usd, ...

# multirun: agents
AGENT_STATUS: Final = "multirun.agent.status"
AGENT_CONFIG_ID: Final = "multirun.agent.config_id"

# multirun: steps
STEP_ID: Final = "multirun.step.id"  # the hex span id of the step's span
STEP_NAME: Final = "multirun.step.name"
STEP_KIND: Final = "multirun.step.kind"
STEP_STATUS: Final = "multirun.step.status"
STEP_ATTEMPT: Final = "multirun.step.attempt"
STEP_INPUT_HASH: Final = "multirun.step.input_hash"
STEP_INPUT: Final = "multirun.step.input"
STEP_OUTPUT: Final = "multirun.step.output"
STEP_RETRY_DELAY: Final = "multirun.step.retry_delay_seconds"
STEP_STREAM_ITEMS: Final = "multirun.step.stream_items"
STEP_STREAM_UNFINISHED: Final = "multirun.step.stream_unfinished"  # its agent ended before its stream did
STEP_UNFINISHED: Final = "multirun.step.unfinished"  # its agent ended before the future it returned did
POLICY_DECISION: Final = "multirun.policy.decision"
POLICY_RULE: Final = "multirun.policy.rule"
POLICY_WAIT_SECONDS: Final = "multirun.policy.wait_seconds"
# the model a GracefulDegradationRule gave the step, whatever its decision (also "wait")
POLICY_FALLBACK_MODEL: Final = "multirun.policy.fallback_model"

# multirun: roll-ups (the sum over everything below, so backends never add twice)
TOKENS_USED: Final = "multirun.tokens_used"
COST_USD: Final = "multirun.cost_usd"
STEPS_USED: Final = "multirun.steps_used"
UNPRICED: Final = "multirun.cost.unpriced"  # some usage had no known price
USAGE_UNKNOWN: Final = "multirun.usage.unknown"  # a model call whose provider gave no token counts

# multirun: checkpoints
CHECKPOINT_ID: Final = "multirun.checkpoint.id"
CHECKPOINT_NAME: Final = "multirun.checkpoint.name"
CHECKPOINT_URI: Final = "multirun.checkpoint.uri"
CHECKPOINT_SIZE: Final = "multirun.checkpoint.size_bytes"
CHECKPOINT_DIGEST: Final = "multirun.checkpoint.digest"
CHECKPOINT_SERIALIZER: Final = "multirun.checkpoint.serializer"

# multirun: the Motus integration
MOTUS_TASK_ID: Final = "multirun.motus.task.id"
MOTUS_TASK_TYPE: Final = "multirun.motus.task.type"
MOTUS_DEPENDS_ON: Final = "multirun.motus.task.depends_on"  # the upstream tasks' names

# Event names
EVENT_RETRY: Final = "multirun.step.retry"
EVENT_CHECKPOINT: Final = "multirun.checkpoint"
