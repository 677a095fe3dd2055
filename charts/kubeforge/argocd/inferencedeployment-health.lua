-- Argo CD health of a kubeforge InferenceDeployment: Healthy when Ready (a request can be served),
-- Degraded when Stalled or Failed/Degraded, else Progressing.
local hs = {}
local function condition(status, type)
  if status.conditions ~= nil then
    for _, c in ipairs(status.conditions) do
      if c.type == type then return c end
    end
  end
  return nil
end
if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator"
  return hs
end
local status = obj.status
if obj.metadata.generation ~= nil and status.observedGeneration ~= nil
    and status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end
local ready = condition(status, "Ready")
local stalled = condition(status, "Stalled")
hs.message = status.message or status.phase
if (stalled ~= nil and stalled.status == "True") or status.phase == "Failed" or status.phase == "Degraded" then
  hs.status = "Degraded"
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
else
  hs.status = "Progressing"
end
return hs
