"""Finish reasons as the OpenAI API names them and as they cross the mesh (common.proto)."""

from services.mesh.stubs import common_pb2

TO_PROTO = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}
FROM_PROTO = {code: name for name, code in TO_PROTO.items()}
